#include "tools/experiment/stats.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <string>

namespace memsnap::experiment {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

bool all_finite(std::span<const double> xs) {
  return std::all_of(xs.begin(), xs.end(), [](double x) { return std::isfinite(x); });
}

// A uniform index in [0, n) from one 64-bit draw (multiply-shift; the bias is at most n / 2^64).
std::size_t draw_index(std::mt19937_64& rng, std::size_t n) {
  const unsigned __int128 wide = static_cast<unsigned __int128>(rng()) * n;
  return static_cast<std::size_t>(wide >> 64);
}

// The positions a type-7 quantile reads: lo, and lo + 1 with weight frac when frac > 0.
struct QuantilePos {
  std::size_t lo = 0;
  std::size_t hi = 0;
  double frac = 0;
};

QuantilePos quantile_pos(std::size_t n, double q) {
  q = std::clamp(q, 0.0, 1.0);
  const double h = static_cast<double>(n - 1) * q;
  QuantilePos pos;
  pos.lo = std::min(static_cast<std::size_t>(std::floor(h)), n - 1);
  pos.frac = h - static_cast<double>(pos.lo);
  pos.hi = pos.frac > 0 && pos.lo + 1 < n ? pos.lo + 1 : pos.lo;
  if (pos.hi == pos.lo) pos.frac = 0;
  return pos;
}

double interpolate(double lo, double hi, double frac) {
  if (frac == 0 || lo == hi) return lo;
  if (std::isinf(hi) || std::isinf(lo)) return frac < 1 ? lo + (hi > lo ? kInf : -kInf) : hi;
  return lo + frac * (hi - lo);
}

// Type-7 quantiles of `buf` (any order; reordered in place): selects only the order statistics
// needed, each with nth_element on the part right of the previous one.
void quantiles_in_place(std::vector<double>& buf, std::span<const double> qs,
                        std::vector<double>& out) {
  const std::size_t n = buf.size();
  std::vector<QuantilePos> pos(qs.size());
  std::vector<std::size_t> needed;
  needed.reserve(qs.size() * 2);
  for (std::size_t i = 0; i < qs.size(); ++i) {
    pos[i] = quantile_pos(n, qs[i]);
    needed.push_back(pos[i].lo);
    needed.push_back(pos[i].hi);
  }
  std::sort(needed.begin(), needed.end());
  needed.erase(std::unique(needed.begin(), needed.end()), needed.end());
  auto first = buf.begin();
  for (std::size_t k : needed) {
    auto nth = buf.begin() + static_cast<std::ptrdiff_t>(k);
    std::nth_element(first, nth, buf.end());
    first = nth + 1;
  }
  out.resize(qs.size());
  for (std::size_t i = 0; i < qs.size(); ++i) {
    out[i] = interpolate(buf[pos[i].lo], buf[pos[i].hi], pos[i].frac);
  }
}

// Type-7 quantiles of bootstrap resamples of one sample, in O(n) per resample: the sample is
// sorted once; a resample is a count per sorted position (n uniform draws), and an order
// statistic of the resample is found by walking the cumulative counts.
class QuantileResampler {
 public:
  QuantileResampler(std::span<const double> samples, std::span<const double> qs)
      : sorted_(samples.begin(), samples.end()), counts_(samples.size()) {
    std::sort(sorted_.begin(), sorted_.end());
    const std::size_t n = sorted_.size();
    for (double q : qs) {
      pos_.push_back(quantile_pos(n, q));
      needed_.push_back(pos_.back().lo);
      needed_.push_back(pos_.back().hi);
    }
    std::sort(needed_.begin(), needed_.end());
    needed_.erase(std::unique(needed_.begin(), needed_.end()), needed_.end());
    values_.resize(needed_.size());
  }

  // The quantiles of the original sample.
  void original(std::vector<double>& out) const {
    out.resize(pos_.size());
    for (std::size_t i = 0; i < pos_.size(); ++i) {
      out[i] = interpolate(sorted_[pos_[i].lo], sorted_[pos_[i].hi], pos_[i].frac);
    }
  }

  // The quantiles of one resample drawn from rng.
  void resample(std::mt19937_64& rng, std::vector<double>& out) {
    const std::size_t n = sorted_.size();
    std::fill(counts_.begin(), counts_.end(), 0U);
    for (std::size_t i = 0; i < n; ++i) ++counts_[draw_index(rng, n)];
    // values_[k] = the needed_[k]-th smallest (0-based) of the resample.
    std::size_t below = 0;  // resample values at sorted positions < j
    std::size_t j = 0;
    for (std::size_t k = 0; k < needed_.size(); ++k) {
      while (below + counts_[j] <= needed_[k]) below += counts_[j++];
      values_[k] = sorted_[j];
    }
    out.resize(pos_.size());
    for (std::size_t i = 0; i < pos_.size(); ++i) {
      out[i] = interpolate(value_at(pos_[i].lo), value_at(pos_[i].hi), pos_[i].frac);
    }
  }

 private:
  double value_at(std::size_t order) const {
    const auto it = std::lower_bound(needed_.begin(), needed_.end(), order);
    return values_[static_cast<std::size_t>(it - needed_.begin())];
  }

  std::vector<double> sorted_;
  std::vector<std::uint32_t> counts_;
  std::vector<QuantilePos> pos_;
  std::vector<std::size_t> needed_;
  std::vector<double> values_;
};

Status check_bootstrap(const BootstrapOptions& options, std::span<const double> qs) {
  if (options.resamples < 1) {
    return make_error(Errc::kInvalidArgument, "bootstrap: resamples must be >= 1");
  }
  if (!(options.confidence > 0 && options.confidence < 1)) {
    return make_error(Errc::kInvalidArgument, "bootstrap: confidence must be in (0,1)");
  }
  if (qs.empty()) return make_error(Errc::kInvalidArgument, "bootstrap: no quantiles asked for");
  for (double q : qs) {
    if (!(q >= 0 && q <= 1)) {
      return make_error(Errc::kInvalidArgument, "bootstrap: quantile outside [0,1]");
    }
  }
  return {};
}

Status check_samples(std::span<const double> samples, const char* what) {
  if (samples.empty()) {
    return make_error(Errc::kInvalidArgument, std::string(what) + ": no samples");
  }
  if (!all_finite(samples)) {
    return make_error(Errc::kInvalidArgument, std::string(what) + ": a sample is not finite");
  }
  return {};
}

// The percentile interval of each column of `stats` (B rows of k values).
std::vector<Interval> percentile_intervals(std::vector<std::vector<double>>& columns,
                                           const std::vector<double>& estimates,
                                           double confidence) {
  std::vector<Interval> out(columns.size());
  const double tail = (1 - confidence) / 2;
  for (std::size_t i = 0; i < columns.size(); ++i) {
    std::sort(columns[i].begin(), columns[i].end());
    out[i].estimate = estimates[i];
    out[i].low = quantile_sorted(columns[i], tail);
    out[i].high = quantile_sorted(columns[i], 1 - tail);
    out[i].confidence = confidence;
  }
  return out;
}

enum class TwoArmStat { kRatio, kDifference };

double combine(TwoArmStat stat, double t, double b) {
  if (stat == TwoArmStat::kDifference) return t - b;
  if (b == 0) return t == 0 ? 1.0 : (t > 0 ? kInf : -kInf);
  return t / b;
}

Result<std::vector<Interval>> two_arm_bootstrap(std::span<const double> treatment,
                                                std::span<const double> baseline,
                                                std::span<const double> qs,
                                                const BootstrapOptions& options, TwoArmStat stat) {
  MEMSNAP_RETURN_IF_ERROR(check_samples(treatment, "bootstrap treatment"));
  MEMSNAP_RETURN_IF_ERROR(check_samples(baseline, "bootstrap baseline"));
  MEMSNAP_RETURN_IF_ERROR(check_bootstrap(options, qs));

  QuantileResampler t_res(treatment, qs);
  QuantileResampler b_res(baseline, qs);
  std::vector<double> t_q;
  std::vector<double> b_q;
  t_res.original(t_q);
  b_res.original(b_q);
  std::vector<double> estimates(qs.size());
  for (std::size_t i = 0; i < qs.size(); ++i) {
    if (stat == TwoArmStat::kRatio && !(b_q[i] > 0)) {
      return make_error(Errc::kInvalidArgument,
                        "bootstrap ratio: the baseline quantile " + std::to_string(qs[i]) +
                            " is not positive, a ratio is meaningless (use a difference)");
    }
    estimates[i] = combine(stat, t_q[i], b_q[i]);
  }

  const auto b_count = static_cast<std::size_t>(options.resamples);
  std::vector<std::vector<double>> columns(qs.size(), std::vector<double>(b_count));
  std::mt19937_64 rng(options.seed);
  for (std::size_t r = 0; r < b_count; ++r) {
    t_res.resample(rng, t_q);
    b_res.resample(rng, b_q);
    for (std::size_t i = 0; i < qs.size(); ++i) columns[i][r] = combine(stat, t_q[i], b_q[i]);
  }
  return percentile_intervals(columns, estimates, options.confidence);
}

// Counts of arrangements of m values of one sample and n of the other (no ties) by their U
// (pairs with the first sample above the second): index u in [0, m n]. Knapsack over the pooled
// sorted positions: putting a first-sample value at position i after j of them were placed puts
// it above the i - j second-sample values before it.
std::vector<double> exact_u_counts(std::size_t m, std::size_t n) {
  const std::size_t max_u = m * n;
  std::vector<std::vector<double>> dp(m + 1, std::vector<double>(max_u + 1, 0.0));
  dp[0][0] = 1;
  const std::size_t total = m + n;
  for (std::size_t i = 0; i < total; ++i) {
    const std::size_t j_max = std::min(i, m - 1);
    for (std::size_t jj = j_max + 1; jj-- > 0;) {
      if (i - jj > n) continue;  // more than n second-sample values before: impossible
      const std::size_t add = i - jj;
      const std::vector<double>& from = dp[jj];
      std::vector<double>& to = dp[jj + 1];
      for (std::size_t u = 0; u + add <= max_u; ++u) {
        if (from[u] != 0) to[u + add] += from[u];
      }
    }
  }
  return dp[m];
}

}  // namespace

double quantile_sorted(std::span<const double> sorted, double q) {
  assert(!sorted.empty());
  const QuantilePos pos = quantile_pos(sorted.size(), q);
  return interpolate(sorted[pos.lo], sorted[pos.hi], pos.frac);
}

Result<double> quantile(std::span<const double> samples, double q) {
  MEMSNAP_RETURN_IF_ERROR(check_samples(samples, "quantile"));
  if (!std::isfinite(q)) return make_error(Errc::kInvalidArgument, "quantile: q is not finite");
  std::vector<double> buf(samples.begin(), samples.end());
  std::vector<double> out;
  const double qs[] = {q};
  quantiles_in_place(buf, qs, out);
  return out[0];
}

Result<Interval> bootstrap_quantile_ci(std::span<const double> samples, double q,
                                       const BootstrapOptions& options) {
  const double qs[] = {q};
  MEMSNAP_ASSIGN_OR_RETURN(std::vector<Interval> r, bootstrap_quantiles_ci(samples, qs, options));
  return r[0];
}

Result<std::vector<Interval>> bootstrap_quantiles_ci(std::span<const double> samples,
                                                     std::span<const double> qs,
                                                     const BootstrapOptions& options) {
  MEMSNAP_RETURN_IF_ERROR(check_samples(samples, "bootstrap"));
  MEMSNAP_RETURN_IF_ERROR(check_bootstrap(options, qs));

  QuantileResampler resampler(samples, qs);
  std::vector<double> values;
  resampler.original(values);
  const std::vector<double> estimates = values;

  const auto b_count = static_cast<std::size_t>(options.resamples);
  std::vector<std::vector<double>> columns(qs.size(), std::vector<double>(b_count));
  std::mt19937_64 rng(options.seed);
  for (std::size_t r = 0; r < b_count; ++r) {
    resampler.resample(rng, values);
    for (std::size_t i = 0; i < qs.size(); ++i) columns[i][r] = values[i];
  }
  return percentile_intervals(columns, estimates, options.confidence);
}

Result<std::vector<Interval>> bootstrap_quantile_ratio_ci(std::span<const double> treatment,
                                                          std::span<const double> baseline,
                                                          std::span<const double> qs,
                                                          const BootstrapOptions& options) {
  return two_arm_bootstrap(treatment, baseline, qs, options, TwoArmStat::kRatio);
}

Result<std::vector<Interval>> bootstrap_quantile_difference_ci(std::span<const double> treatment,
                                                               std::span<const double> baseline,
                                                               std::span<const double> qs,
                                                               const BootstrapOptions& options) {
  return two_arm_bootstrap(treatment, baseline, qs, options, TwoArmStat::kDifference);
}

Result<MannWhitneyResult> mann_whitney_u(std::span<const double> a, std::span<const double> b,
                                         MannWhitneyMethod method) {
  if (a.empty() || b.empty()) {
    return make_error(Errc::kInvalidArgument, "mann-whitney: both samples need values");
  }
  auto has_nan = [](std::span<const double> xs) {
    return std::any_of(xs.begin(), xs.end(), [](double x) { return std::isnan(x); });
  };
  if (has_nan(a) || has_nan(b)) {
    return make_error(Errc::kInvalidArgument, "mann-whitney: a sample is NaN");
  }

  struct Tagged {
    double value;
    bool in_a;
  };
  std::vector<Tagged> pooled;
  pooled.reserve(a.size() + b.size());
  for (double x : a) pooled.push_back({x, true});
  for (double x : b) pooled.push_back({x, false});
  std::sort(pooled.begin(), pooled.end(),
            [](const Tagged& l, const Tagged& r) { return l.value < r.value; });

  // Average ranks (1-based) over runs of equal values; tie term sum(t^3 - t).
  double rank_sum_a = 0;
  double tie_term = 0;
  const std::size_t total = pooled.size();
  for (std::size_t i = 0; i < total;) {
    std::size_t j = i + 1;
    while (j < total && pooled[j].value == pooled[i].value) ++j;
    const double t = static_cast<double>(j - i);
    const double avg_rank = (static_cast<double>(i + 1) + static_cast<double>(j)) / 2;
    for (std::size_t k = i; k < j; ++k) {
      if (pooled[k].in_a) rank_sum_a += avg_rank;
    }
    tie_term += t * t * t - t;
    i = j;
  }

  MannWhitneyResult r;
  r.n_a = a.size();
  r.n_b = b.size();
  r.ties = tie_term > 0;
  const double na = static_cast<double>(r.n_a);
  const double nb = static_cast<double>(r.n_b);
  const double nn = na + nb;
  r.u_a = rank_sum_a - na * (na + 1) / 2;
  r.u_b = na * nb - r.u_a;
  r.common_language = r.u_a / (na * nb);
  r.rank_biserial = 2 * r.common_language - 1;

  const double mean = na * nb / 2;
  const double var = na * nb / 12 * ((nn + 1) - (nn > 1 ? tie_term / (nn * (nn - 1)) : 0));
  const double dev = r.u_a - mean;
  if (var > 0) {
    const double corrected = std::max(0.0, std::fabs(dev) - 0.5);
    r.z = (dev < 0 ? -corrected : corrected) / std::sqrt(var);
  }

  bool exact = false;
  switch (method) {
    case MannWhitneyMethod::kExact:
      if (r.ties) {
        return make_error(Errc::kInvalidArgument,
                          "mann-whitney: the exact distribution needs data without ties");
      }
      exact = true;
      break;
    case MannWhitneyMethod::kNormal:
      exact = false;
      break;
    case MannWhitneyMethod::kAuto:
      exact = !r.ties && r.n_a * r.n_b <= kExactLimit;
      break;
  }

  if (exact) {
    const std::size_t m = std::min(r.n_a, r.n_b);
    const std::size_t n = std::max(r.n_a, r.n_b);
    const std::vector<double> counts = exact_u_counts(m, n);
    // The null distribution is symmetric about mn/2, so that of U_a is the same whichever
    // sample was the smaller one.
    const auto u = static_cast<std::size_t>(std::llround(r.u_a));
    double all = 0;
    double at_most = 0;
    double at_least = 0;
    for (std::size_t k = 0; k < counts.size(); ++k) {
      all += counts[k];
      if (k <= u) at_most += counts[k];
      if (k >= u) at_least += counts[k];
    }
    r.p_value = std::min(1.0, 2 * std::min(at_most, at_least) / all);
    r.exact = true;
  } else if (var > 0) {
    r.p_value = std::min(1.0, 2 * normal_sf(std::fabs(r.z)));
  } else {
    r.p_value = 1;  // every value equal: no evidence either way
  }
  return r;
}

Result<SrmResult> sample_ratio_mismatch(std::span<const std::uint64_t> observed,
                                        std::span<const double> weights, double threshold) {
  if (observed.size() != weights.size()) {
    return make_error(Errc::kInvalidArgument, "srm: one weight per arm is needed");
  }
  if (observed.size() < 2) return make_error(Errc::kInvalidArgument, "srm: fewer than 2 arms");
  if (!(threshold > 0 && threshold < 1)) {
    return make_error(Errc::kInvalidArgument, "srm: threshold must be in (0,1)");
  }
  double weight_sum = 0;
  SrmResult r;
  r.threshold = threshold;
  int included = 0;
  for (std::size_t i = 0; i < weights.size(); ++i) {
    if (!(std::isfinite(weights[i]) && weights[i] >= 0)) {
      return make_error(Errc::kInvalidArgument, "srm: weights must be finite and >= 0");
    }
    if (weights[i] == 0 && observed[i] > 0) {
      return make_error(Errc::kInvalidArgument,
                        "srm: arm " + std::to_string(i) + " has weight 0 but " +
                            std::to_string(observed[i]) + " units were assigned to it");
    }
    weight_sum += weights[i];
    r.total += observed[i];
    if (weights[i] > 0) ++included;
  }
  if (weight_sum == 0) return make_error(Errc::kInvalidArgument, "srm: all weights are 0");
  if (included < 2) {
    return make_error(Errc::kInvalidArgument, "srm: fewer than 2 arms with a weight above 0");
  }
  if (r.total == 0) return make_error(Errc::kInvalidArgument, "srm: no units observed");

  const double total = static_cast<double>(r.total);
  r.expected.resize(weights.size());
  r.observed_share.resize(weights.size());
  r.expected_share.resize(weights.size());
  for (std::size_t i = 0; i < weights.size(); ++i) {
    r.expected_share[i] = weights[i] / weight_sum;
    r.expected[i] = total * r.expected_share[i];
    r.observed_share[i] = static_cast<double>(observed[i]) / total;
    if (weights[i] > 0) {
      const double d = static_cast<double>(observed[i]) - r.expected[i];
      r.chi2 += d * d / r.expected[i];
    }
  }
  r.dof = included - 1;
  r.p_value = chi_square_sf(r.chi2, r.dof);
  r.mismatch = r.p_value < threshold;
  return r;
}

double regularized_gamma_p(double a, double x) {
  if (!(a > 0) || std::isnan(x)) return std::numeric_limits<double>::quiet_NaN();
  if (x <= 0) return 0;
  if (std::isinf(x)) return 1;
  if (x >= a + 1) return 1 - regularized_gamma_q(a, x);
  // Series: P(a,x) = x^a e^-x / Gamma(a+1) * sum_k x^k / ((a+1)...(a+k)).
  double term = 1 / a;
  double sum = term;
  for (int k = 1; k < 10000; ++k) {
    term *= x / (a + k);
    sum += term;
    if (std::fabs(term) < std::fabs(sum) * 1e-16) break;
  }
  return std::min(1.0, sum * std::exp(-x + a * std::log(x) - std::lgamma(a)));
}

double regularized_gamma_q(double a, double x) {
  if (!(a > 0) || std::isnan(x)) return std::numeric_limits<double>::quiet_NaN();
  if (x <= 0) return 1;
  if (std::isinf(x)) return 0;
  if (x < a + 1) return 1 - regularized_gamma_p(a, x);
  // Continued fraction for Q(a,x) = e^-x x^a / Gamma(a) * 1/(x+1-a- 1(1-a)/(x+3-a- 2(2-a)/...)),
  // evaluated with the modified Lentz method.
  constexpr double kTiny = 1e-300;
  double b = x + 1 - a;
  double c = 1 / kTiny;
  double d = 1 / b;
  double h = d;
  for (int i = 1; i < 10000; ++i) {
    const double an = -i * (i - a);
    b += 2;
    d = an * d + b;
    if (std::fabs(d) < kTiny) d = kTiny;
    c = b + an / c;
    if (std::fabs(c) < kTiny) c = kTiny;
    d = 1 / d;
    const double delta = d * c;
    h *= delta;
    if (std::fabs(delta - 1) < 1e-16) break;
  }
  return std::min(1.0, std::exp(-x + a * std::log(x) - std::lgamma(a)) * h);
}

double chi_square_sf(double x, double dof) {
  if (!(dof > 0)) return std::numeric_limits<double>::quiet_NaN();
  if (x <= 0) return 1;
  return regularized_gamma_q(dof / 2, x / 2);
}

double normal_sf(double z) { return 0.5 * std::erfc(z / std::sqrt(2.0)); }

std::vector<double> holm_adjust(std::span<const double> p_values) {
  const std::size_t m = p_values.size();
  std::vector<std::size_t> order(m);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](std::size_t l, std::size_t r) { return p_values[l] < p_values[r]; });
  std::vector<double> adjusted(m);
  double running = 0;
  for (std::size_t rank = 0; rank < m; ++rank) {
    const std::size_t i = order[rank];
    const double scaled = std::min(1.0, static_cast<double>(m - rank) * p_values[i]);
    running = std::max(running, scaled);
    adjusted[i] = running;
  }
  return adjusted;
}

std::vector<double> bonferroni_adjust(std::span<const double> p_values) {
  std::vector<double> adjusted(p_values.size());
  const auto m = static_cast<double>(p_values.size());
  for (std::size_t i = 0; i < p_values.size(); ++i) {
    adjusted[i] = std::min(1.0, m * p_values[i]);
  }
  return adjusted;
}

}  // namespace memsnap::experiment
