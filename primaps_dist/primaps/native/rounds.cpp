// PriMaPs proposal rounds, one image at a time, on the CPU (primaps_dist/primaps/native/__init__.py).
//
// The same method as primaps_dist/primaps/rounds.py (solver: eigen.py, sign: orientation.py), for one
// image per call instead of a batch per round: the batched path pays Python and dispatch overhead per
// round and streams every image's Gram matrix through the cache once per product, while here all
// rounds of an image run back to back on data that stays in cache. Images run in parallel over the
// intra-op thread pool. Large products and all LAPACK calls go through ATen (MKL), the same routines
// the batched path uses; element-wise work is plain loops.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

namespace {

struct SolverSettings {
  int64_t max_iterations;
  double residual_tolerance;
  double degenerate_fraction;
  std::vector<double> nodes;  // Chebyshev nodes of the filter polynomial, in application order
};

struct RoundSettings {
  float threshold;
  float coverage;
  int64_t max_masks;
};

// A v for rows v [k, C] given v G: v G - ((v s) / n) s^T, with s the free sum and n the free count.
void apply_covariance(const at::Tensor& vectors, const at::Tensor& vectors_gram, const at::Tensor& free_sum,
                      float inverse_count, at::Tensor& out) {
  const int64_t k = vectors.size(0), channels = vectors.size(1);
  const float* v = vectors.data_ptr<float>();
  const float* vg = vectors_gram.data_ptr<float>();
  const float* s = free_sum.data_ptr<float>();
  float* o = out.data_ptr<float>();
  for (int64_t row = 0; row < k; ++row) {
    float dot = 0.0f;
    for (int64_t c = 0; c < channels; ++c) dot += v[row * channels + c] * s[c];
    const float scale = dot * inverse_count;
    for (int64_t c = 0; c < channels; ++c) o[row * channels + c] = vg[row * channels + c] - scale * s[c];
  }
}

struct Image {
  // Inputs (views into the batch tensors).
  at::Tensor points;        // [P, C] float32 centred features, row-major positions
  at::Tensor mean;          // [C]
  at::Tensor inverse_norm;  // [P]
  at::Tensor gram;          // [C, C] running Gram matrix of the free rows (updated in place)
  at::Tensor free_sum;      // [C] (updated in place)
  float total_variance;
  at::Tensor basis;         // [k, C] orthonormal rows (warm start)
  // Outputs.
  int64_t* mask_id;         // [P]
  float* mask_value;        // [P]
  int64_t count = 0;
};

class ImageRounds {
 public:
  ImageRounds(Image& image, const SolverSettings& solver, const RoundSettings& settings)
      : im_(image), solver_(solver), settings_(settings) {
    positions_ = im_.points.size(0);
    channels_ = im_.points.size(1);
    block_ = im_.basis.size(0);
    stored_rows_ = im_.points;
    stored_position_.resize(positions_);
    for (int64_t p = 0; p < positions_; ++p) stored_position_[p] = p;
    free_.assign(positions_, 1);
    free_count_ = positions_;
    basis_ = im_.basis.clone();
  }

  void run() {
    bool running = true;
    for (int64_t round = 0; round < settings_.max_masks && running; ++round) {
      drop_covered_rows();
      running = one_round();
    }
  }

 private:
  Image& im_;
  const SolverSettings& solver_;
  const RoundSettings& settings_;
  int64_t positions_, channels_, block_;
  at::Tensor stored_rows_;                 // [Q, C] the rows that may still be free
  std::vector<int64_t> stored_position_;   // [Q] their positions (increasing)
  std::vector<char> free_;                 // [Q]
  int64_t free_count_;
  at::Tensor basis_, gram_basis_;          // [k, C]; gram_basis_ undefined when unknown
  bool have_smallest_ = false;
  float smallest_ = 0.0f;

  void drop_covered_rows() {
    const int64_t stored = static_cast<int64_t>(stored_position_.size());
    if (free_count_ == 0 || free_count_ > stored / 2) return;
    std::vector<int64_t> keep;
    keep.reserve(free_count_);
    for (int64_t q = 0; q < stored; ++q)
      if (free_[q]) keep.push_back(q);
    at::Tensor index = torch::from_blob(keep.data(), {static_cast<int64_t>(keep.size())}, torch::kInt64);
    stored_rows_ = stored_rows_.index_select(0, index);
    std::vector<int64_t> positions(keep.size());
    for (size_t i = 0; i < keep.size(); ++i) positions[i] = stored_position_[keep[i]];
    stored_position_.swap(positions);
    free_.assign(keep.size(), 1);
  }

  // Top eigenvector of A = G - s s^T / n (eigen.top_direction for one image). Updates basis_,
  // gram_basis_ (Ritz basis and its G product) and smallest_; returns the unit direction [C].
  at::Tensor top_direction() {
    const float inverse_count = 1.0f / std::max<float>(static_cast<float>(free_count_), 1.0f);
    const float floor_value = static_cast<float>(solver_.degenerate_fraction) * im_.total_variance;
    const at::Tensor& gram = im_.gram;
    at::Tensor rows = basis_;
    at::Tensor gram_rows = gram_basis_.defined() ? gram_basis_ : at::mm(rows, gram);
    at::Tensor applied = at::empty_like(rows);
    apply_covariance(rows, gram_rows, im_.free_sum, inverse_count, applied);
    const bool filter_first = have_smallest_;
    at::Tensor filtered = at::empty_like(rows), filtered_gram = at::empty_like(rows);
    at::Tensor next = at::empty_like(rows);
    for (int64_t iteration = 0; iteration < solver_.max_iterations; ++iteration) {
      if (filter_first || iteration > 0) {
        const int64_t n = rows.numel();
        {
          const float shift = static_cast<float>(solver_.nodes[0] * smallest_);
          const float* a = applied.data_ptr<float>();
          const float* r = rows.data_ptr<float>();
          float* f = filtered.data_ptr<float>();
          for (int64_t i = 0; i < n; ++i) f[i] = a[i] - shift * r[i];
        }
        for (size_t j = 1; j < solver_.nodes.size(); ++j) {
          at::mm_out(filtered_gram, filtered, gram);
          apply_covariance(filtered, filtered_gram, im_.free_sum, inverse_count, next);
          const float shift = static_cast<float>(solver_.nodes[j] * smallest_);
          const float* f = filtered.data_ptr<float>();
          float* x = next.data_ptr<float>();
          for (int64_t i = 0; i < n; ++i) x[i] -= shift * f[i];
          std::swap(filtered, next);
        }
        rows = std::get<0>(at::linalg_qr(filtered.t())).t().contiguous();
        gram_rows = at::mm(rows, gram);
        applied = at::empty_like(rows);
        apply_covariance(rows, gram_rows, im_.free_sum, inverse_count, applied);
      }
      at::Tensor projected = at::mm(rows, applied.t());
      projected = 0.5 * (projected + projected.t());
      auto [values, vectors] = at::linalg_eigh(projected);
      at::Tensor rotation = vectors.flip({-1}).t().contiguous();  // rows: Ritz coefficients, largest first
      rows = at::mm(rotation, rows);
      gram_rows = at::mm(rotation, gram_rows);
      applied = at::mm(rotation, applied);
      const float* vals = values.data_ptr<float>();
      smallest_ = vals[0];
      have_smallest_ = true;
      const float top = vals[block_ - 1];
      const float* a = applied.data_ptr<float>();
      const float* r = rows.data_ptr<float>();
      float residual = 0.0f;
      for (int64_t c = 0; c < channels_; ++c) {
        const float d = a[c] - top * r[c];
        residual += d * d;
      }
      residual = std::sqrt(residual);
      const bool converged =
          residual <= static_cast<float>(solver_.residual_tolerance) * top || top <= floor_value;
      if (converged) break;
    }
    basis_ = rows;
    gram_basis_ = gram_rows;
    at::Tensor direction = rows[0].clone();
    const float norm = std::max(direction.norm().item<float>(), 1e-12f);
    direction.div_(norm);
    return direction;
  }

  // +1 / -1: the orientation torch.pca_lowrank(q=3) gives the direction (orientation.py, one image).
  // Also returns the stored rows' products with the direction ([Q]) through direction_dots.
  float reference_sign(const at::Tensor& direction, at::Tensor& direction_dots) {
    const int64_t rank = std::min<int64_t>({3, block_, channels_});
    at::Tensor top3 = basis_.narrow(0, 0, rank);
    at::Tensor vectors = at::cat({direction.unsqueeze(0), top3}, 0);  // [1 + q, C]
    at::Tensor products = at::mm(stored_rows_, vectors.t());          // [Q, 1 + q]
    direction_dots = products.select(1, 0).contiguous();
    if (free_count_ < 1) return 1.0f;
    at::Tensor free_mean = im_.free_sum / static_cast<float>(std::max<int64_t>(free_count_, 1));
    at::Tensor offsets = at::mv(top3, free_mean);  // [q]
    // A E: free rows, row-major order, centred on the free mean, in float64.
    at::Tensor compact = at::empty({free_count_, rank}, torch::kFloat64);
    {
      const int64_t stored = static_cast<int64_t>(free_.size());
      const float* p = products.data_ptr<float>();
      const float* off = offsets.data_ptr<float>();
      double* out = compact.data_ptr<double>();
      int64_t i = 0;
      for (int64_t q = 0; q < stored; ++q) {
        if (!free_[q]) continue;
        for (int64_t j = 0; j < rank; ++j) out[i * rank + j] = static_cast<double>(p[q * (1 + rank) + 1 + j] - off[j]);
        ++i;
      }
    }
    // E^T A^T A = E^T G - (E^T S) S^T / n.
    at::Tensor covariance_rows =
        gram_basis_.narrow(0, 0, rank) - at::mv(top3, im_.free_sum).unsqueeze(1) * free_mean.unsqueeze(0);
    at::Tensor rows64 = top3.to(torch::kFloat64);
    at::Tensor direction64 = direction.to(torch::kFloat64);
    at::Tensor oriented;
    if (free_count_ >= channels_) {
      at::Tensor triangle = std::get<1>(at::linalg_qr(compact));  // [q, q]
      at::Tensor small = at::linalg_solve_triangular(triangle.t(), covariance_rows.to(torch::kFloat64),
                                                     /*upper=*/false);
      small = at::nan_to_num(small, 0.0, 0.0, 0.0);
      oriented = std::get<2>(at::linalg_svd(small, /*full_matrices=*/false))[0];
    } else {
      auto [wide_q, wide_r] = at::linalg_qr(rows64.t());
      at::Tensor wide_compact = at::linalg_solve_triangular(wide_r, compact, /*upper=*/true, /*left=*/false);
      const int64_t used = std::min(rank, free_count_);
      at::Tensor exact = wide_compact.narrow(1, 0, used).t();  // [q', n]
      at::Tensor left = std::get<0>(at::linalg_svd(exact, /*full_matrices=*/false)).select(1, 0);
      oriented = at::mv(wide_q.narrow(1, 0, used), left);
    }
    return at::dot(oriented, direction64).item<double>() < 0.0 ? -1.0f : 1.0f;
  }

  // cos(v, n) at the stored rows from their centred products: (dots + v . mean) * inverse_norm, 0 at covered.
  void cosines(const at::Tensor& centred_dots, const at::Tensor& vector, std::vector<float>& out) const {
    const float offset = at::dot(vector, im_.mean).item<float>();
    const int64_t stored = static_cast<int64_t>(free_.size());
    const float* d = centred_dots.data_ptr<float>();
    const float* inv = im_.inverse_norm.data_ptr<float>();
    out.resize(stored);
    for (int64_t q = 0; q < stored; ++q)
      out[q] = free_[q] ? (d[q] + offset) * inv[stored_position_[q]] : 0.0f;
  }

  bool one_round() {
    at::Tensor direction = top_direction();
    at::Tensor direction_dots;
    const float sign = reference_sign(direction, direction_dots);
    if (sign < 0) {
      direction.neg_();
      direction_dots.neg_();
    }
    std::vector<float> similarity;
    cosines(direction_dots, direction, similarity);
    const int64_t stored = static_cast<int64_t>(free_.size());
    int64_t seed = -1;
    for (int64_t q = 0; q < stored; ++q)
      if (free_[q] && (seed < 0 || similarity[q] > similarity[seed])) seed = q;
    if (seed < 0) return false;
    // Nearest-neighbour refinement from the best free position.
    const float seed_inverse_norm = im_.inverse_norm.data_ptr<float>()[stored_position_[seed]];
    at::Tensor unit = (stored_rows_[seed] + im_.mean) * seed_inverse_norm;
    cosines(at::mv(stored_rows_, unit), unit, similarity);
    float peak = 0.0f;  // covered rows count as 0, as in the batched path
    for (int64_t q = 0; q < stored; ++q) peak = std::max(peak, similarity[q]);
    if (!(peak > 0.0f)) return false;
    const float cut = settings_.threshold * peak;
    std::vector<int64_t> kept;
    for (int64_t q = 0; q < stored; ++q)
      if (free_[q] && similarity[q] > 0.0f && similarity[q] >= cut) kept.push_back(q);
    im_.count += 1;
    for (int64_t q : kept) {
      im_.mask_id[stored_position_[q]] = im_.count;
      im_.mask_value[stored_position_[q]] = similarity[q] / peak;
    }
    cover(kept);
    const float covered_fraction = static_cast<float>(positions_ - free_count_) / static_cast<float>(positions_);
    return covered_fraction < settings_.coverage && im_.count < settings_.max_masks;
  }

  // Mark rows covered; down-date the Gram matrix, the free sum and (when cheap) the basis' G product.
  void cover(const std::vector<int64_t>& kept) {
    const int64_t newly = static_cast<int64_t>(kept.size());
    if (newly == 0) return;
    std::vector<int64_t> index(kept);
    at::Tensor rows = stored_rows_.index_select(
        0, torch::from_blob(index.data(), {newly}, torch::kInt64));  // [w, C]
    im_.free_sum.sub_(rows.sum(0));
    im_.gram.addmm_(rows.t(), rows, /*beta=*/1.0, /*alpha=*/-1.0);
    if (4 * newly <= channels_ && gram_basis_.defined()) {
      gram_basis_.addmm_(at::mm(basis_, rows.t()), rows, 1.0, -1.0);
    } else {
      gram_basis_ = at::Tensor();
    }
    for (int64_t q : kept) free_[q] = 0;
    free_count_ -= newly;
  }
};

}  // namespace

// points [B, Q, C] float32 centred (rows >= P unused), mean [B, C], inverse_norm [B, Q], gram [B, C, C]
// (overwritten), free_sum [B, C] (overwritten), total_variance [B], basis [B, k, C], positions P; solver
// settings; round settings. Returns (mask_id [B, P] int64, mask_value [B, P] float32, counts [B] int64).
std::vector<at::Tensor> proposal_rounds(at::Tensor points, at::Tensor mean, at::Tensor inverse_norm, at::Tensor gram,
                                        at::Tensor free_sum, at::Tensor total_variance, at::Tensor basis,
                                        int64_t positions, int64_t max_iterations, double residual_tolerance,
                                        double degenerate_fraction, std::vector<double> nodes, double threshold,
                                        double coverage, int64_t max_masks) {
  TORCH_CHECK(points.dim() == 3 && points.scalar_type() == torch::kFloat32 && points.is_contiguous(),
              "points must be a contiguous float32 [B, Q, C] tensor");
  TORCH_CHECK(positions >= 1 && positions <= points.size(1) && inverse_norm.size(1) >= positions,
              "positions must be in [1, Q]");
  TORCH_CHECK(gram.is_contiguous() && free_sum.is_contiguous() && basis.is_contiguous() && mean.is_contiguous() &&
                  inverse_norm.is_contiguous() && total_variance.is_contiguous(),
              "state tensors must be contiguous");
  at::NoGradGuard no_grad;
  const int64_t batch = points.size(0);
  at::Tensor mask_id = at::zeros({batch, positions}, torch::kInt64);
  at::Tensor mask_value = at::zeros({batch, positions}, torch::kFloat32);
  at::Tensor counts = at::zeros({batch}, torch::kInt64);
  const SolverSettings solver{max_iterations, residual_tolerance, degenerate_fraction, nodes};
  const RoundSettings settings{static_cast<float>(threshold), static_cast<float>(coverage), max_masks};
  const float* variance = total_variance.data_ptr<float>();
  int64_t* count_out = counts.data_ptr<int64_t>();
  // Images take very different numbers of rounds, so each thread picks the next image when it has
  // finished one.
  std::atomic<int64_t> next_image{0};
  const int64_t workers = std::min<int64_t>(batch, at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t b = next_image++; b < batch; b = next_image++) {
      Image image{points[b].narrow(0, 0, positions), mean[b], inverse_norm[b], gram[b], free_sum[b], variance[b], basis[b],
                  mask_id[b].data_ptr<int64_t>(), mask_value[b].data_ptr<float>()};
      ImageRounds(image, solver, settings).run();
      count_out[b] = image.count;
    }
  });
  return {mask_id, mask_value, counts};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("proposal_rounds", &proposal_rounds, "PriMaPs proposal rounds per image on the CPU");
}
