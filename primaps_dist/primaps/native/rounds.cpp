// PriMaPs proposal rounds, one image at a time, on the CPU (primaps_dist/primaps/native/__init__.py).
//
// The same method as primaps_dist/primaps/rounds.py (solver: eigen.py, sign: orientation.py), for one
// image per call instead of a batch per round: the batched path pays Python and dispatch overhead per
// round and streams every image's Gram matrix through the cache once per product, while here all
// rounds of an image run back to back on data that stays in cache. Images run in parallel, one
// worker thread per torch intra-op thread.
//
// A round is a few dozen small products and four small LAPACK calls, so tensor-library overhead per
// call (allocation, checks, layout copies) would cost as much as the arithmetic: products and LAPACK
// go straight to BLAS/LAPACK (linalg.h), and the working buffers of an image live as long as the
// image. Matrices are row-major.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "linalg.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace {

using namespace primaps_native;

// ---- the rounds of one image -------------------------------------------------------------------

struct SolverSettings {
  int max_iterations;
  double residual_tolerance;
  double degenerate_fraction;
  std::vector<double> nodes;  // Chebyshev nodes of the filter polynomial, in application order
};

struct RoundSettings {
  float threshold;
  float coverage;
  int64_t max_masks;
};

struct Image {
  const float* features;  // [C, P] one feature map, positions row-major
  const float* sketch;    // [P, k] fixed random matrix of the start basis (eigen.start_sketch)
  int64_t* mask_id;       // [P] output
  float* mask_value;      // [P] output
  int64_t count = 0;      // output
};

class ImageRounds {
 public:
  ImageRounds(Image& image, int positions, int channels, int block, const SolverSettings& solver,
              const RoundSettings& settings)
      : im_(image), solver_(solver), settings_(settings), positions_(positions), channels_(channels), block_(block),
        rank_(std::min({3, block, channels})), eigen_(block), thin_q_(channels, block) {
    const size_t vectors = static_cast<size_t>(block) * channels;
    for (auto* buffer : {&rows_, &gram_rows_, &applied_, &filtered_, &filtered_gram_, &next_, &rotated_})
      buffer->resize(vectors);
    projected_.resize(static_cast<size_t>(block) * block);
    set_up();
    stored_position_.resize(positions);
    for (int p = 0; p < positions; ++p) stored_position_[p] = p;
    free_.assign(positions, 1);
    free_count_ = positions;
    dots_.resize(positions);
    similarity_.resize(positions);
    direction_.resize(channels);
    unit_.resize(channels);
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
  const int positions_, channels_, block_, rank_;
  SymmetricEigen eigen_;
  ThinQ thin_q_;
  // Per-image statistics (rounds.WorkingSet's, for one image).
  std::vector<float> mean_, inverse_norm_, gram_, free_sum_;  // [C], [P] by position, [C, C], [C]
  float total_variance_ = 0.0f;
  // Stored rows [Q, C]: the centred rows that may still be free (all, then compacted copies).
  std::vector<float> stored_rows_;
  std::vector<int> stored_position_;  // [Q] positions of the stored rows (increasing)
  std::vector<char> free_;            // [Q]
  int free_count_;
  // Solver state: Ritz basis rows [k, C], its G product (valid when have_gram_rows_).
  std::vector<float> rows_, gram_rows_, applied_, filtered_, filtered_gram_, next_, rotated_, projected_;
  bool have_gram_rows_ = false, have_smallest_ = false;
  float smallest_ = 0.0f;
  // Per-round buffers.
  std::vector<float> dots_, similarity_, direction_, unit_, covered_, covered_basis_, products_;
  std::vector<double> sign_work_, small_, compact_, tau_, singular_, left_, right_;
  std::vector<int> sign_iwork_;

  int stored_count() const { return static_cast<int>(stored_position_.size()); }

  // Centred rows X = f^T - mean [P, C], inverse norms of the uncentred features, the Gram matrix X^T X,
  // the free sum and the start basis orth(X^T sketch) (eigen.start_basis).
  void set_up() {
    const int channels = channels_, positions = positions_;
    const float* f = im_.features;
    mean_.resize(channels);
    std::vector<double> square_norm(positions, 0.0);
    for (int c = 0; c < channels; ++c) {
      const float* row = f + static_cast<size_t>(c) * positions;
      double partial[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // independent sums, vectorised
      int p = 0;
      for (; p + 8 <= positions; p += 8)
        for (int lane = 0; lane < 8; ++lane) partial[lane] += row[p + lane];
      double total = 0.0;
      for (; p < positions; ++p) total += row[p];
      for (double value : partial) total += value;
      for (p = 0; p < positions; ++p) square_norm[p] += static_cast<double>(row[p]) * row[p];
      mean_[c] = static_cast<float>(total / positions);
    }
    inverse_norm_.resize(positions);
    for (int p = 0; p < positions; ++p) {
      const double norm = std::sqrt(square_norm[p]);
      TORCH_CHECK_VALUE(std::isfinite(norm), "features contain NaN or Inf values");
      // As F.normalize: exactly 0 at zero vectors.
      inverse_norm_[p] = norm > 0.0 ? static_cast<float>(1.0 / std::max(norm, 1e-12)) : 0.0f;
    }
    stored_rows_.resize(static_cast<size_t>(positions) * channels);
    constexpr int tile = 32;  // transpose in tiles, so both sides stay in cache
    for (int c0 = 0; c0 < channels; c0 += tile)
      for (int p0 = 0; p0 < positions; p0 += tile)
        for (int c = c0; c < std::min(c0 + tile, channels); ++c) {
          const float* row = f + static_cast<size_t>(c) * positions;
          for (int p = p0; p < std::min(p0 + tile, positions); ++p)
            stored_rows_[static_cast<size_t>(p) * channels + c] = row[p] - mean_[c];
        }
    const float* centred = stored_rows_.data();
    free_sum_.assign(channels, 0.0f);
    for (int p = 0; p < positions; ++p) {
      const float* x = centred + static_cast<size_t>(p) * channels;
      for (int c = 0; c < channels; ++c) free_sum_[c] += x[c];
    }
    // G = X^T X computing 3/4 of the blocks (symmetry), as eigen.gram.
    gram_.resize(static_cast<size_t>(channels) * channels);
    const int half = channels / 2;
    if (half < 32) {
      gemm(true, false, channels, channels, positions, 1.0f, centred, channels, centred, channels, 0.0f, gram_.data(),
           channels);
    } else {
      gemm(true, false, half, channels, positions, 1.0f, centred, channels, centred, channels, 0.0f, gram_.data(),
           channels);
      gemm(true, false, channels - half, channels - half, positions, 1.0f, centred + half, channels, centred + half,
           channels, 0.0f, gram_.data() + static_cast<size_t>(half) * channels + half, channels);
      for (int i = half; i < channels; ++i)
        for (int j = 0; j < half; ++j)
          gram_[static_cast<size_t>(i) * channels + j] = gram_[static_cast<size_t>(j) * channels + i];
    }
    total_variance_ = 0.0f;
    for (int c = 0; c < channels; ++c) total_variance_ += gram_[static_cast<size_t>(c) * channels + c];
    // Start basis: rows of Q from the QR of X^T sketch [C, k] (column-major = row-major [k, C]).
    gemm(true, false, block_, channels, positions, 1.0f, im_.sketch, block_, centred, channels, 0.0f, rows_.data(),
         channels);
    thin_q_(rows_.data());
  }

  void drop_covered_rows() {
    const int stored = stored_count();
    if (free_count_ == 0 || free_count_ > stored / 2) return;
    std::vector<float> compact(static_cast<size_t>(free_count_) * channels_);
    std::vector<int> positions;
    positions.reserve(free_count_);
    for (int q = 0; q < stored; ++q) {
      if (!free_[q]) continue;
      std::memcpy(compact.data() + positions.size() * channels_, stored_rows_.data() + static_cast<size_t>(q) * channels_,
                  sizeof(float) * channels_);
      positions.push_back(stored_position_[q]);
    }
    stored_rows_.swap(compact);
    stored_position_.swap(positions);
    free_.assign(stored_position_.size(), 1);
  }

  // A v for rows v [k, C] given v G: v G - ((v s) / n) s^T, with s the free sum and n the free count.
  void apply_covariance(const float* vectors, const float* vectors_gram, float inverse_count, float* out) const {
    for (int row = 0; row < block_; ++row) {
      const float* v = vectors + static_cast<size_t>(row) * channels_;
      const float* vg = vectors_gram + static_cast<size_t>(row) * channels_;
      float* o = out + static_cast<size_t>(row) * channels_;
      const float scale = dot(v, free_sum_.data(), channels_) * inverse_count;
      for (int c = 0; c < channels_; ++c) o[c] = vg[c] - scale * free_sum_[c];
    }
  }

  // rows_ (and gram_rows_, applied_) <- rotation @ them, rotation rows = eigenvectors, largest first.
  void rotate(const float* eigenvectors) {
    // Reorder LAPACK's ascending eigenvectors (rows of `eigenvectors`) into the rotation, largest first.
    std::vector<float>& rotation = filtered_gram_;  // free here; [k, k] fits in [k, C] (k <= C)
    for (int i = 0; i < block_; ++i)
      std::memcpy(rotation.data() + static_cast<size_t>(i) * block_,
                  eigenvectors + static_cast<size_t>(block_ - 1 - i) * block_, sizeof(float) * block_);
    for (std::vector<float>* target : {&rows_, &gram_rows_, &applied_}) {
      gemm(false, false, block_, channels_, block_, 1.0f, rotation.data(), block_, target->data(), channels_, 0.0f,
           rotated_.data(), channels_);
      target->swap(rotated_);
    }
  }

  // Top eigenvector of A = G - s s^T / n (eigen.top_direction for one image) into direction_; updates
  // the Ritz basis rows_, gram_rows_ and smallest_.
  void top_direction() {
    const float inverse_count = 1.0f / std::max(static_cast<float>(free_count_), 1.0f);
    const float floor_value = static_cast<float>(solver_.degenerate_fraction) * total_variance_;
    const int vectors = block_ * channels_;
    if (!have_gram_rows_)
      gemm(false, false, block_, channels_, channels_, 1.0f, rows_.data(), channels_, gram_.data(), channels_, 0.0f,
           gram_rows_.data(), channels_);
    apply_covariance(rows_.data(), gram_rows_.data(), inverse_count, applied_.data());
    const bool filter_first = have_smallest_;
    for (int iteration = 0; iteration < solver_.max_iterations; ++iteration) {
      if (filter_first || iteration > 0) {
        const float first_shift = static_cast<float>(solver_.nodes[0] * smallest_);
        for (int i = 0; i < vectors; ++i) filtered_[i] = applied_[i] - first_shift * rows_[i];
        for (size_t j = 1; j < solver_.nodes.size(); ++j) {
          gemm(false, false, block_, channels_, channels_, 1.0f, filtered_.data(), channels_, gram_.data(), channels_,
               0.0f, filtered_gram_.data(), channels_);
          apply_covariance(filtered_.data(), filtered_gram_.data(), inverse_count, next_.data());
          const float shift = static_cast<float>(solver_.nodes[j] * smallest_);
          for (int i = 0; i < vectors; ++i) next_[i] -= shift * filtered_[i];
          filtered_.swap(next_);
        }
        thin_q_(filtered_.data());  // orthonormal rows spanning the filtered block
        rows_.swap(filtered_);
        gemm(false, false, block_, channels_, channels_, 1.0f, rows_.data(), channels_, gram_.data(), channels_, 0.0f,
             gram_rows_.data(), channels_);
        apply_covariance(rows_.data(), gram_rows_.data(), inverse_count, applied_.data());
      }
      // Rayleigh-Ritz: V (A V)^T, symmetrised.
      gemm(false, true, block_, block_, channels_, 1.0f, rows_.data(), channels_, applied_.data(), channels_, 0.0f,
           projected_.data(), block_);
      for (int i = 0; i < block_; ++i)
        for (int j = 0; j < i; ++j) {
          const float upper = projected_[i * block_ + j], lower = projected_[j * block_ + i];
          projected_[i * block_ + j] = 0.5f * (upper + lower);
          projected_[j * block_ + i] = 0.5f * (lower + upper);
        }
      const float* values = eigen_(projected_.data());
      rotate(projected_.data());
      smallest_ = values[0];
      have_smallest_ = true;
      const float top = values[block_ - 1];
      float residual = 0.0f;
      for (int c = 0; c < channels_; ++c) {
        const float difference = applied_[c] - top * rows_[c];
        residual += difference * difference;
      }
      residual = std::sqrt(residual);
      if (residual <= static_cast<float>(solver_.residual_tolerance) * top || top <= floor_value) break;
    }
    have_gram_rows_ = true;
    const float norm = std::max(std::sqrt(dot(rows_.data(), rows_.data(), channels_)), 1e-12f);
    for (int c = 0; c < channels_; ++c) direction_[c] = rows_[c] / norm;
  }

  // A E at every free row, in row-major order: column-major [n_free, q] float64 (one product over the
  // stored rows).
  void free_projections(const float* offsets, std::vector<double>& out) {
    const int stored = stored_count(), q = rank_;
    products_.resize(static_cast<size_t>(stored) * q);
    gemm(false, true, stored, q, channels_, 1.0f, stored_rows_.data(), channels_, rows_.data(), channels_, 0.0f, products_.data(), q);
    out.assign(static_cast<size_t>(free_count_) * q, 0.0);
    int found = 0;
    for (int row = 0; row < stored; ++row) {
      if (!free_[row]) continue;
      for (int j = 0; j < q; ++j)
        out[found + static_cast<size_t>(j) * free_count_] = static_cast<double>(products_[row * q + j] - offsets[j]);
      ++found;
    }
  }

  // A E at stored row q: (x_q - free mean) . e_j for j < rank, in float64.
  void projection(int q, const float* offsets, double* out, int stride) const {
    const float* x = stored_rows_.data() + static_cast<size_t>(q) * channels_;
    for (int j = 0; j < rank_; ++j)
      out[j * stride] = static_cast<double>(dot(x, rows_.data() + static_cast<size_t>(j) * channels_, channels_) -
                                            offsets[j]);
  }

  // R [q, q] (row-major, upper) of the Householder QR of A E [n_free, q] in the tall case. Householder
  // QR's R depends only on the first q rows X and on the Gram matrix of the rest, T = (A E)^T (A E) -
  // X^T X (each reflector is set by its column's leading entry and norm, its effect on the leading
  // rows by inner products), so it is the R of the [2q, q] matrix [X; chol(T)^T]. Falls back to all
  // free rows when T is not safely positive definite (a reflector could then meet an exactly zero
  // column, where LAPACK keeps a sign that a tiny nonzero tail would flip).
  void tall_triangle(const float* offsets, const double* gram_ae, double* triangle) {
    const int q = rank_;
    std::vector<double>& a = compact_;  // column-major [m, q]
    int m = 2 * q;
    bool compressed = free_count_ >= 2 * q;
    if (compressed) {
      a.assign(static_cast<size_t>(m) * q, 0.0);
      int found = 0;
      for (int row = 0; row < stored_count() && found < q; ++row)
        if (free_[row]) projection(row, offsets, a.data() + found++, m);
      double tail[9], factor[9] = {0, 0, 0, 0, 0, 0, 0, 0, 0}, trace = 0.0;
      for (int i = 0; i < q; ++i) {
        trace += gram_ae[i * q + i];
        for (int j = 0; j < q; ++j) {
          double head = 0.0;
          for (int r = 0; r < q; ++r) head += a[r + i * m] * a[r + j * m];
          tail[i * q + j] = 0.5 * (gram_ae[i * q + j] + gram_ae[j * q + i]) - head;
        }
      }
      for (int j = 0; j < q && compressed; ++j) {  // Cholesky T = L L^T
        double pivot = tail[j * q + j];
        for (int r = 0; r < j; ++r) pivot -= factor[j * q + r] * factor[j * q + r];
        if (!(pivot > 1e-10 * trace)) {
          compressed = false;
          break;
        }
        factor[j * q + j] = std::sqrt(pivot);
        for (int i = j + 1; i < q; ++i) {
          double value = tail[i * q + j];
          for (int r = 0; r < j; ++r) value -= factor[i * q + r] * factor[j * q + r];
          factor[i * q + j] = value / factor[j * q + j];
        }
      }
      if (compressed)  // rows q..2q-1: L^T
        for (int i = 0; i < q; ++i)
          for (int j = 0; j < q; ++j) a[(q + i) + j * m] = factor[j * q + i];
    }
    if (!compressed) {
      m = free_count_;
      free_projections(offsets, a);
    }
    tau_.resize(q);
    householder_qr(m, q, a.data(), tau_.data(), triangle, /*form_q=*/false, sign_work_);
  }

  // +1 / -1: the orientation torch.pca_lowrank(q=3) gives the direction (orientation.py, one image).
  float reference_sign() {
    if (free_count_ < 1) return 1.0f;
    const int q = rank_, channels = channels_;
    const float inverse_free = 1.0f / static_cast<float>(std::max(free_count_, 1));
    std::vector<float> free_mean(channels);
    for (int c = 0; c < channels; ++c) free_mean[c] = free_sum_[c] * inverse_free;
    float offsets[3];
    for (int j = 0; j < q; ++j) offsets[j] = dot(rows_.data() + static_cast<size_t>(j) * channels, free_mean.data(), channels);
    // E^T A^T A = E^T G - (E^T S) S^T / n, float64 [q, C].
    std::vector<double> covariance(static_cast<size_t>(q) * channels);
    for (int j = 0; j < q; ++j) {
      const float* e = rows_.data() + static_cast<size_t>(j) * channels;
      const float* eg = gram_rows_.data() + static_cast<size_t>(j) * channels;
      const float weight = dot(e, free_sum_.data(), channels);
      for (int c = 0; c < channels; ++c)
        covariance[static_cast<size_t>(j) * channels + c] = static_cast<double>(eg[c] - weight * free_mean[c]);
    }
    double oriented_dot = 0.0;
    if (free_count_ >= channels) {
      double gram_ae[9], triangle[9];
      for (int i = 0; i < q; ++i)
        for (int j = 0; j < q; ++j) {
          double total = 0.0;
          for (int c = 0; c < channels; ++c)
            total += covariance[static_cast<size_t>(i) * channels + c] *
                     static_cast<double>(rows_[static_cast<size_t>(j) * channels + c]);
          gram_ae[i * q + j] = total;
        }
      tall_triangle(offsets, gram_ae, triangle);
      // small = R^-T covariance [q, C], column-major for the SVD; NaN/Inf (rank-deficient A E) -> 0.
      small_.assign(static_cast<size_t>(q) * channels, 0.0);
      for (int c = 0; c < channels; ++c)
        for (int i = 0; i < q; ++i) {
          double value = covariance[static_cast<size_t>(i) * channels + c];
          for (int r = 0; r < i; ++r) value -= triangle[r * q + i] * small_[r + static_cast<size_t>(c) * q];
          small_[i + static_cast<size_t>(c) * q] = value / triangle[i * q + i];
        }
      for (double& value : small_)
        if (!std::isfinite(value)) value = 0.0;
      singular_.resize(q);
      left_.resize(static_cast<size_t>(q) * q);
      right_.resize(static_cast<size_t>(q) * channels);
      thin_svd(q, channels, small_.data(), singular_.data(), left_.data(), right_.data(), sign_work_, sign_iwork_);
      for (int c = 0; c < channels; ++c)  // Vh[0] . direction
        oriented_dot += right_[static_cast<size_t>(c) * q] * static_cast<double>(direction_[c]);
    } else {
      // pca_lowrank transposes A: Q = qr(E).Q, B = (A Q)^T = (A E R_E^-1)^T, direction Q U[:, 0].
      const int n = free_count_, used = std::min(q, n);
      std::vector<double> basis(static_cast<size_t>(channels) * q);
      double r_e[9];
      for (int j = 0; j < q; ++j)  // column-major [C, q] = E^T
        for (int c = 0; c < channels; ++c)
          basis[c + static_cast<size_t>(j) * channels] = static_cast<double>(rows_[static_cast<size_t>(j) * channels + c]);
      tau_.resize(q);
      householder_qr(channels, q, basis.data(), tau_.data(), r_e, /*form_q=*/true, sign_work_);  // basis: Q
      // exact = (A E R_E^-1)[:, :used]^T, column-major [used, n]: row i of A Q solves x R_E = (A E)_i.
      free_projections(offsets, compact_);
      small_.assign(static_cast<size_t>(used) * n, 0.0);
      double solved[3];
      for (int column = 0; column < n; ++column) {
        for (int j = 0; j < q; ++j) {
          double value = compact_[column + static_cast<size_t>(j) * n];
          for (int r = 0; r < j; ++r) value -= solved[r] * r_e[r * q + j];
          solved[j] = value / r_e[j * q + j];
        }
        for (int i = 0; i < used; ++i) small_[i + static_cast<size_t>(column) * used] = solved[i];
      }
      const int smaller = std::min(used, n);
      singular_.resize(smaller);
      left_.resize(static_cast<size_t>(used) * smaller);
      right_.resize(static_cast<size_t>(smaller) * n);
      thin_svd(used, n, small_.data(), singular_.data(), left_.data(), right_.data(), sign_work_, sign_iwork_);
      for (int c = 0; c < channels; ++c) {  // (Q U[:, 0]) . direction
        double value = 0.0;
        for (int j = 0; j < used; ++j) value += basis[c + static_cast<size_t>(j) * channels] * left_[j];
        oriented_dot += value * static_cast<double>(direction_[c]);
      }
    }
    return oriented_dot < 0.0 ? -1.0f : 1.0f;
  }

  // similarity_[q] = cos(v, n_q) at free stored rows (0 at covered ones) from dots_ = stored @ v.
  void cosines(const float* vector) {
    const float offset = dot(vector, mean_.data(), channels_);
    for (int q = 0; q < stored_count(); ++q)
      similarity_[q] = free_[q] ? (dots_[q] + offset) * inverse_norm_[stored_position_[q]] : 0.0f;
  }

  bool one_round() {
    top_direction();
    const float sign = reference_sign();
    for (int c = 0; c < channels_; ++c) direction_[c] *= sign;
    const int stored = stored_count();
    gemv(stored, channels_, stored_rows_.data(), channels_, direction_.data(), dots_.data());
    cosines(direction_.data());
    int seed = -1;
    for (int q = 0; q < stored; ++q)
      if (free_[q] && (seed < 0 || similarity_[q] > similarity_[seed])) seed = q;
    if (seed < 0) return false;
    // Nearest-neighbour refinement from the best free position.
    const float seed_inverse_norm = inverse_norm_[stored_position_[seed]];
    const float* seed_row = stored_rows_.data() + static_cast<size_t>(seed) * channels_;
    for (int c = 0; c < channels_; ++c) unit_[c] = (seed_row[c] + mean_[c]) * seed_inverse_norm;
    gemv(stored, channels_, stored_rows_.data(), channels_, unit_.data(), dots_.data());
    cosines(unit_.data());
    float peak = 0.0f;  // covered rows count as 0, as in the batched path
    for (int q = 0; q < stored; ++q) peak = std::max(peak, similarity_[q]);
    if (!(peak > 0.0f)) return false;
    const float cut = settings_.threshold * peak;
    std::vector<int> kept;
    for (int q = 0; q < stored; ++q)
      if (free_[q] && similarity_[q] > 0.0f && similarity_[q] >= cut) kept.push_back(q);
    im_.count += 1;
    for (int q : kept) {
      im_.mask_id[stored_position_[q]] = im_.count;
      im_.mask_value[stored_position_[q]] = similarity_[q] / peak;
    }
    cover(kept);
    const float covered_fraction = static_cast<float>(positions_ - free_count_) / static_cast<float>(positions_);
    return covered_fraction < settings_.coverage && im_.count < settings_.max_masks;
  }

  // Mark rows covered; down-date the Gram matrix, the free sum and (when cheap) the basis' G product.
  void cover(const std::vector<int>& kept) {
    const int newly = static_cast<int>(kept.size());
    if (newly == 0) return;
    covered_.resize(static_cast<size_t>(newly) * channels_);
    for (int i = 0; i < newly; ++i) {
      const float* row = stored_rows_.data() + static_cast<size_t>(kept[i]) * channels_;
      std::memcpy(covered_.data() + static_cast<size_t>(i) * channels_, row, sizeof(float) * channels_);
    }
    for (int c = 0; c < channels_; ++c) {
      float total = 0.0f;
      for (int i = 0; i < newly; ++i) total += covered_[static_cast<size_t>(i) * channels_ + c];
      free_sum_[c] -= total;
    }
    // G -= W^T W with W [w, C] the covered rows.
    gemm(true, false, channels_, channels_, newly, -1.0f, covered_.data(), channels_, covered_.data(), channels_,
         1.0f, gram_.data(), channels_);
    if (4 * newly <= channels_ && have_gram_rows_) {
      covered_basis_.resize(static_cast<size_t>(block_) * newly);  // V W^T [k, w]
      gemm(false, true, block_, newly, channels_, 1.0f, rows_.data(), channels_, covered_.data(), channels_, 0.0f,
           covered_basis_.data(), newly);
      gemm(false, false, block_, channels_, newly, -1.0f, covered_basis_.data(), newly, covered_.data(), channels_,
           1.0f, gram_rows_.data(), channels_);
    } else {
      have_gram_rows_ = false;
    }
    for (int q : kept) free_[q] = 0;
    free_count_ -= newly;
  }
};

}  // namespace

// features [B, C, P] float32 (P = h * w positions, row-major), sketch [P, k] (eigen.start_sketch);
// solver settings; round settings. Returns (mask_id [B, P] int64, mask_value [B, P] float32, counts [B] int64).
std::vector<at::Tensor> proposal_rounds(at::Tensor features, at::Tensor sketch, int64_t max_iterations,
                                        double residual_tolerance, double degenerate_fraction,
                                        std::vector<double> nodes, double threshold, double coverage,
                                        int64_t max_masks) {
  for (const at::Tensor* tensor : {&features, &sketch})
    TORCH_CHECK(tensor->device().is_cpu() && tensor->scalar_type() == torch::kFloat32 && tensor->is_contiguous(),
                "proposal_rounds expects contiguous float32 CPU tensors");
  TORCH_CHECK(features.dim() == 3 && sketch.dim() == 2, "features must be [B, C, P] and sketch [P, k]");
  const int64_t batch = features.size(0), channels = features.size(1), positions = features.size(2);
  const int64_t block = sketch.size(1);
  TORCH_CHECK(sketch.size(0) == positions && block >= 1 && block <= channels && !nodes.empty(),
              "sketch must be [P, k] with 1 <= k <= C");
  at::Tensor mask_id = at::zeros({batch, positions}, torch::kInt64);
  at::Tensor mask_value = at::zeros({batch, positions}, torch::kFloat32);
  at::Tensor counts = at::zeros({batch}, torch::kInt64);
  const SolverSettings solver{static_cast<int>(max_iterations), residual_tolerance, degenerate_fraction, nodes};
  const RoundSettings settings{static_cast<float>(threshold), static_cast<float>(coverage), max_masks};
  const float* feature_data = features.data_ptr<float>();
  const float* sketch_data = sketch.data_ptr<float>();
  int64_t* ids = mask_id.data_ptr<int64_t>();
  float* values = mask_value.data_ptr<float>();
  int64_t* count_out = counts.data_ptr<int64_t>();
  // One worker per torch intra-op thread (std::threads: at::parallel_for's OpenMP region is compiled
  // into the caller, and this extension is built without OpenMP). Images take very different numbers
  // of rounds, so each worker picks the next image when it has finished one.
  std::atomic<int64_t> next_image{0};
  std::mutex failure_lock;
  std::exception_ptr failure;
  auto work = [&]() {
    try {
      const OneMklThread one_mkl_thread;
      for (int64_t b = next_image++; b < batch; b = next_image++) {
        Image image{feature_data + b * channels * positions, sketch_data, ids + b * positions, values + b * positions};
        ImageRounds(image, static_cast<int>(positions), static_cast<int>(channels), static_cast<int>(block), solver,
                    settings)
            .run();
        count_out[b] = image.count;
      }
    } catch (...) {
      const std::lock_guard<std::mutex> guard(failure_lock);
      if (!failure) failure = std::current_exception();
      next_image = batch;  // the others stop after their current image
    }
  };
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(batch, at::get_num_threads()));
  {
    pybind11::gil_scoped_release no_gil;
    std::vector<std::thread> helpers;
    for (int64_t i = 1; i < workers; ++i) helpers.emplace_back(work);
    work();
    for (std::thread& helper : helpers) helper.join();
  }
  if (failure) std::rethrow_exception(failure);
  return {mask_id, mask_value, counts};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("proposal_rounds", &proposal_rounds, "PriMaPs proposal rounds per image on the CPU");
}
