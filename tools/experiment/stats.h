// Statistics for A/B(/C) latency experiments: quantiles, percentile-bootstrap confidence
// intervals, the Mann-Whitney U test, the sample-ratio-mismatch (SRM) check and a
// multiple-comparison correction.
//
// Pure computation on doubles: no I/O, no dependency on the memsnap runtime. Every random
// procedure takes a seed and draws from std::mt19937_64 with its own integer-to-index mapping
// (no std::uniform_int_distribution, whose output differs between standard libraries), so the
// same inputs and seed give the same interval everywhere.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "core/base/result.h"

namespace memsnap::experiment {

// ---------------------------------------------------------------------------------------------
// Quantiles
//
// Definition: Hyndman & Fan type 7 (the default of R, NumPy and Excel's PERCENTILE.INC): for n
// sorted samples x[0..n-1] and q in [0,1], h = (n-1)q and
//   Q(q) = x[floor(h)] + (h - floor(h)) * (x[floor(h)+1] - x[floor(h)]),
// so Q(0) is the minimum, Q(1) the maximum and Q(0.5) the usual median.
// ---------------------------------------------------------------------------------------------

// `sorted` must be sorted ascending and non-empty; q is clamped to [0,1].
double quantile_sorted(std::span<const double> sorted, double q);
// Any order; copies and partially sorts. Error (kInvalidArgument) if empty or q is not finite.
Result<double> quantile(std::span<const double> samples, double q);

// ---------------------------------------------------------------------------------------------
// Percentile bootstrap
//
// B resamples of size n drawn with replacement; the statistic is computed on each, and the
// interval is the (1-c)/2 and (1+c)/2 type-7 quantiles of the B values (the plain percentile
// bootstrap, no bias correction). The estimate is the statistic on the original sample(s).
// Caveat: for tail quantiles the percentile bootstrap is only as good as the tail data; a p99
// interval from fewer than ~500 samples rests on fewer than 5 points beyond the quantile.
// ---------------------------------------------------------------------------------------------

struct BootstrapOptions {
  int resamples = 2000;      // B
  double confidence = 0.95;  // c, in (0,1)
  std::uint64_t seed = 20240601;
};

struct Interval {
  double estimate = 0;
  double low = 0;
  double high = 0;
  double confidence = 0.95;
  // True if [low, high] contains x.
  bool contains(double x) const { return low <= x && x <= high; }
};

// CI of one quantile.
Result<Interval> bootstrap_quantile_ci(std::span<const double> samples, double q,
                                       const BootstrapOptions& options = {});
// CIs of several quantiles from the same resamples (cheaper; results in the order of qs).
Result<std::vector<Interval>> bootstrap_quantiles_ci(std::span<const double> samples,
                                                     std::span<const double> qs,
                                                     const BootstrapOptions& options = {});

// CI of Q_q(treatment) / Q_q(baseline), both arms resampled independently, one interval per q.
// Error if a baseline quantile of the original data is <= 0 (the ratio is meaningless); a
// resample whose baseline quantile is 0 contributes +inf to the bootstrap distribution.
Result<std::vector<Interval>> bootstrap_quantile_ratio_ci(std::span<const double> treatment,
                                                          std::span<const double> baseline,
                                                          std::span<const double> qs,
                                                          const BootstrapOptions& options = {});
// CI of Q_q(treatment) - Q_q(baseline) (for metrics where a ratio is undefined, e.g. a baseline
// that releases 0 bytes, or fractions compared in percentage points).
Result<std::vector<Interval>> bootstrap_quantile_difference_ci(
    std::span<const double> treatment, std::span<const double> baseline, std::span<const double> qs,
    const BootstrapOptions& options = {});

// ---------------------------------------------------------------------------------------------
// Mann-Whitney U test (Wilcoxon rank-sum), two-sided
//
// Ranks the pooled samples (ties get their average rank). U_a = R_a - n_a(n_a+1)/2 counts the
// pairs (x in a, y in b) with x > y, ties counting 1/2. Under H0 (one distribution) E[U] =
// n_a n_b / 2 and, with ties t_j, Var[U] = n_a n_b / 12 * ((N+1) - sum(t_j^3 - t_j)/(N(N-1))).
//   kExact : the exact null distribution of U (counted by dynamic programming); valid only
//            without ties; p = min(1, 2 min(P(U <= u), P(U >= u))).
//   kNormal: z = (|U - E[U]| - 1/2) / sqrt(Var[U]) (continuity correction), p = 2 (1 - Phi(z)).
//   kAuto  : exact when there are no ties and n_a * n_b <= kExactLimit, else normal. The normal
//            approximation is good (error in p well under 0.01 at alpha = 0.05) once both
//            samples have ~20 or more values; with ties and tiny samples it is only approximate.
// ---------------------------------------------------------------------------------------------

enum class MannWhitneyMethod { kAuto, kExact, kNormal };
inline constexpr std::size_t kExactLimit = 2500;  // n_a * n_b

struct MannWhitneyResult {
  std::size_t n_a = 0;
  std::size_t n_b = 0;
  double u_a = 0;      // U of sample a (pairs with a > b)
  double u_b = 0;      // n_a n_b - u_a
  double z = 0;        // standardized U_a with continuity correction (sign: + if a tends larger)
  double p_value = 1;  // two-sided
  bool exact = false;  // p from the exact distribution
  bool ties = false;
  // Effect sizes: common-language effect size P(a > b) + P(a = b)/2 = U_a / (n_a n_b), and the
  // rank-biserial correlation 2 * CLES - 1 in [-1, 1] (+1: every a above every b).
  double common_language = 0.5;
  double rank_biserial = 0;
};

// Error if either sample is empty, a value is NaN, or kExact is forced on tied data.
Result<MannWhitneyResult> mann_whitney_u(std::span<const double> a, std::span<const double> b,
                                         MannWhitneyMethod method = MannWhitneyMethod::kAuto);

// ---------------------------------------------------------------------------------------------
// Sample-ratio mismatch
//
// Pearson chi-square goodness of fit of the observed units per arm against the split the flag
// asked for: expected_i = N w_i / sum(w), chi2 = sum (o_i - e_i)^2 / e_i, dof = k - 1.
// mismatch = p < threshold; 0.001 is the usual SRM threshold (an SRM check runs on every
// experiment, so it must rarely fire by chance, and real assignment bugs give tiny p).
// ---------------------------------------------------------------------------------------------

inline constexpr double kDefaultSrmThreshold = 0.001;

struct SrmResult {
  double chi2 = 0;
  int dof = 0;
  double p_value = 1;
  double threshold = kDefaultSrmThreshold;
  bool mismatch = false;
  std::uint64_t total = 0;
  std::vector<double> expected;  // per arm, same order as the input
  std::vector<double> observed_share;
  std::vector<double> expected_share;
};

// Error if the sizes differ, fewer than 2 arms, a weight is negative or not finite, all weights
// are 0, a zero-weight arm has units (it should have none: that is reported as an error, not
// as a mismatch, since chi-square is infinite), or the total is 0. Arms with weight 0 and no
// units are left out of the test (they do not add a degree of freedom).
Result<SrmResult> sample_ratio_mismatch(std::span<const std::uint64_t> observed,
                                        std::span<const double> weights,
                                        double threshold = kDefaultSrmThreshold);

// ---------------------------------------------------------------------------------------------
// Distributions
// ---------------------------------------------------------------------------------------------

// Regularized lower / upper incomplete gamma P(a,x), Q(a,x) = 1 - P(a,x), a > 0, x >= 0.
// Series for x < a + 1, Lentz continued fraction otherwise; relative accuracy ~1e-14.
double regularized_gamma_p(double a, double x);
double regularized_gamma_q(double a, double x);
// P(X >= x) for X ~ chi-square(dof) = Q(dof/2, x/2).
double chi_square_sf(double x, double dof);
// P(Z >= z) for a standard normal Z.
double normal_sf(double z);

// ---------------------------------------------------------------------------------------------
// Multiple comparisons
// ---------------------------------------------------------------------------------------------

// Holm-Bonferroni step-down adjusted p-values (controls the family-wise error rate, uniformly
// more powerful than Bonferroni): with p sorted ascending p_(1..m),
//   adj_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)),
// returned in the input order. Reject H_i at level alpha iff adj_i < alpha.
std::vector<double> holm_adjust(std::span<const double> p_values);
// Bonferroni: min(1, m p_i).
std::vector<double> bonferroni_adjust(std::span<const double> p_values);

}  // namespace memsnap::experiment
