// Row-major BLAS and the small LAPACK calls of the proposal rounds (rounds.cpp), straight to the
// library torch links (MKL in the x86-64 wheels): the routines, arguments and workspace queries that
// ATen uses for at::mm, at::mv, torch.linalg.eigh, torch.linalg.qr and torch.linalg.svd, without a
// tensor library's per-call allocation, checks and layout copies. A row-major [r, c] block is a
// column-major [c, r] one to Fortran.

#pragma once

#include <torch/extension.h>

#include <dlfcn.h>

#include <algorithm>
#include <vector>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void sgemv_(const char* trans, const int* m, const int* n, const float* alpha, const float* a, const int* lda,
            const float* x, const int* incx, const float* beta, float* y, const int* incy);
void ssyevd_(const char* jobz, const char* uplo, const int* n, float* a, const int* lda, float* w, float* work,
             const int* lwork, int* iwork, const int* liwork, int* info);
void sgeqrf_(const int* m, const int* n, float* a, const int* lda, float* tau, float* work, const int* lwork,
             int* info);
void sorgqr_(const int* m, const int* n, const int* k, float* a, const int* lda, const float* tau, float* work,
             const int* lwork, int* info);
void dgeqrf_(const int* m, const int* n, double* a, const int* lda, double* tau, double* work, const int* lwork,
             int* info);
void dorgqr_(const int* m, const int* n, const int* k, double* a, const int* lda, const double* tau, double* work,
             const int* lwork, int* info);
void dgesdd_(const char* jobz, const int* m, const int* n, double* a, const int* lda, double* s, double* u,
             const int* ldu, double* vt, const int* ldvt, double* work, const int* lwork, int* iwork, int* info);
}

namespace primaps_native {


// ---- row-major BLAS ----------------------------------------------------------------------------

// c[m, n] = alpha * op(a) @ op(b) + beta * c, row-major; op(a) is [m, k] (a stored [k, m] when
// transpose_a), op(b) is [k, n] (b stored [n, k] when transpose_b).
void gemm(bool transpose_a, bool transpose_b, int m, int n, int k, float alpha, const float* a, int lda,
          const float* b, int ldb, float beta, float* c, int ldc) {
  if (m == 0 || n == 0) return;
  // Column-major: c^T = op(b)^T op(a)^T.
  sgemm_(transpose_b ? "T" : "N", transpose_a ? "T" : "N", &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
}

// y[m] = a[m, n] @ x, row-major a with leading dimension lda.
void gemv(int m, int n, const float* a, int lda, const float* x, float* y) {
  if (m == 0) return;
  const float one = 1.0f, zero = 0.0f;
  const int step = 1;
  sgemv_("T", &n, &m, &one, a, &lda, x, &step, &zero, y, &step);
}

// x . y with eight running sums (independent chains, which the compiler vectorises).
float dot(const float* x, const float* y, int n) {
  float partial[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int i = 0;
  for (; i + 8 <= n; i += 8)
    for (int lane = 0; lane < 8; ++lane) partial[lane] += x[i + lane] * y[i + lane];
  float total = ((partial[0] + partial[4]) + (partial[1] + partial[5])) + ((partial[2] + partial[6]) + (partial[3] + partial[7]));
  for (; i < n; ++i) total += x[i] * y[i];
  return total;
}

// ---- LAPACK with workspace queries, as ATen calls it -------------------------------------------

// Eigen-decomposition of a symmetric [n, n] matrix in place: ascending values; afterwards row j of
// `matrix` (row-major) is the eigenvector of values[j] (LAPACK's column j).
class SymmetricEigen {
 public:
  explicit SymmetricEigen(int n) : n_(n), values_(n) {
    int lwork = -1, liwork = -1, info = 0, iwork_query = 0;
    float work_query = 0.0f;
    std::vector<float> scratch(static_cast<size_t>(n) * n, 0.0f);
    ssyevd_("V", "L", &n_, scratch.data(), &n_, values_.data(), &work_query, &lwork, &iwork_query, &liwork, &info);
    work_.resize(std::max(1, static_cast<int>(work_query)));
    iwork_.resize(std::max(1, iwork_query));
  }
  const float* operator()(float* matrix) {
    int info = 0;
    const int lwork = static_cast<int>(work_.size()), liwork = static_cast<int>(iwork_.size());
    ssyevd_("V", "L", &n_, matrix, &n_, values_.data(), work_.data(), &lwork, iwork_.data(), &liwork, &info);
    TORCH_CHECK(info == 0, "ssyevd failed with info ", info);
    return values_.data();
  }

 private:
  int n_;
  std::vector<float> values_, work_;
  std::vector<int> iwork_;
};

// Reduced QR of the column-major [m, n] matrix `a` (the row-major [n, m] block of n rows): `a` is
// replaced by Q (orthonormal rows, row-major), as torch.linalg.qr(a^T).Q^T.
class ThinQ {
 public:
  ThinQ(int m, int n) : m_(m), n_(n), tau_(std::max(1, n)) {
    int lwork = -1, info = 0;
    float query = 0.0f;
    std::vector<float> scratch(static_cast<size_t>(m) * n, 0.0f);
    sgeqrf_(&m_, &n_, scratch.data(), &m_, tau_.data(), &query, &lwork, &info);
    factor_work_ = std::max(1, static_cast<int>(query));
    sorgqr_(&m_, &n_, &n_, scratch.data(), &m_, tau_.data(), &query, &lwork, &info);
    form_work_ = std::max(1, static_cast<int>(query));
    work_.resize(std::max(factor_work_, form_work_));
  }
  void operator()(float* a) {
    int info = 0;
    sgeqrf_(&m_, &n_, a, &m_, tau_.data(), work_.data(), &factor_work_, &info);
    TORCH_CHECK(info == 0, "sgeqrf failed with info ", info);
    sorgqr_(&m_, &n_, &n_, a, &m_, tau_.data(), work_.data(), &form_work_, &info);
    TORCH_CHECK(info == 0, "sorgqr failed with info ", info);
  }

 private:
  int m_, n_, factor_work_ = 1, form_work_ = 1;
  std::vector<float> tau_, work_;
};

// Householder QR of a column-major [m, n] float64 matrix (m >= n) in place, as torch.linalg.qr (dgeqrf,
// then dorgqr for Q). `triangle` receives R [n, n] row-major (zeros below the diagonal); with `form_q`,
// `a` then holds Q [m, n], else the reflectors. tau [n].
void householder_qr(int m, int n, double* a, double* tau, double* triangle, bool form_q, std::vector<double>& work) {
  int lwork = -1, info = 0;
  double query = 0.0;
  dgeqrf_(&m, &n, a, &m, tau, &query, &lwork, &info);
  lwork = std::max(1, static_cast<int>(query));
  work.resize(std::max<size_t>(work.size(), lwork));
  dgeqrf_(&m, &n, a, &m, tau, work.data(), &lwork, &info);
  TORCH_CHECK(info == 0, "dgeqrf failed with info ", info);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) triangle[i * n + j] = j >= i ? a[i + static_cast<size_t>(j) * m] : 0.0;
  if (!form_q) return;
  lwork = -1;
  dorgqr_(&m, &n, &n, a, &m, tau, &query, &lwork, &info);
  lwork = std::max(1, static_cast<int>(query));
  work.resize(std::max<size_t>(work.size(), lwork));
  dorgqr_(&m, &n, &n, a, &m, tau, work.data(), &lwork, &info);
  TORCH_CHECK(info == 0, "dorgqr failed with info ", info);
}

// Thin SVD (jobz 'S', as torch.linalg.svd(full_matrices=False)) of a column-major [m, n] float64
// matrix, destroyed. u: column-major [m, min], vt: column-major [min, n].
void thin_svd(int m, int n, double* a, double* s, double* u, double* vt, std::vector<double>& work,
              std::vector<int>& iwork) {
  const int smaller = std::min(m, n);
  int lwork = -1, info = 0;
  double query = 0.0;
  iwork.resize(std::max<size_t>(iwork.size(), 8 * static_cast<size_t>(smaller)));
  dgesdd_("S", &m, &n, a, &m, s, u, &m, vt, &smaller, &query, &lwork, iwork.data(), &info);
  lwork = std::max(1, static_cast<int>(query));
  work.resize(std::max<size_t>(work.size(), lwork));
  dgesdd_("S", &m, &n, a, &m, s, u, &m, vt, &smaller, work.data(), &lwork, iwork.data(), &info);
  TORCH_CHECK(info >= 0, "dgesdd: invalid argument ", -info);
}

// Runs the calling thread's MKL calls on one thread while alive: workers already run images in
// parallel, and each small MKL call would otherwise start a thread team of its own (two workers on two
// cores took 1.35x as long without this: planted bench batch 430 vs 315 ms). Looked up at run
// time (Fortran interface, argument by reference), so BLAS libraries other than MKL simply skip it.
class OneMklThread {
 public:
  OneMklThread() {
    static const auto set_local =
        reinterpret_cast<int (*)(const int*)>(dlsym(RTLD_DEFAULT, "MKL_SET_NUM_THREADS_LOCAL"));
    set_local_ = set_local;
    const int one = 1;
    if (set_local_ != nullptr) previous_ = set_local_(&one);
  }
  ~OneMklThread() {
    if (set_local_ != nullptr) set_local_(&previous_);
  }
  OneMklThread(const OneMklThread&) = delete;
  OneMklThread& operator=(const OneMklThread&) = delete;

 private:
  int (*set_local_)(const int*) = nullptr;
  int previous_ = 0;  // 0: back to the global setting
};

}  // namespace primaps_native
