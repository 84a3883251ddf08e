// Known-answer tests of the experiment statistics and report: hand-computed quantiles, textbook
// Mann-Whitney values, chi-square survival values from tables and closed forms, the false
// positive rate of identical arms, a known 2x shift, and sample-ratio mismatches.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tools/experiment/report.h"
#include "tools/experiment/stats.h"
#include "tools/experiment/svg.h"

namespace memsnap::experiment {
namespace {

std::vector<double> lognormal(std::mt19937_64& rng, std::size_t n, double median, double sigma,
                              double scale = 1) {
  std::lognormal_distribution<double> d(std::log(median), sigma);
  std::vector<double> out(n);
  for (double& x : out) x = scale * d(rng);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Quantiles and bootstrap
// ---------------------------------------------------------------------------------------------

TEST(Quantile, Type7OnKnownData) {
  const std::vector<double> four = {4, 1, 3, 2};  // unsorted on purpose
  EXPECT_DOUBLE_EQ(quantile(four, 0.5).value(), 2.5);
  EXPECT_DOUBLE_EQ(quantile(four, 0.25).value(), 1.75);  // h = 0.75: 1 + 0.75 * (2 - 1)
  EXPECT_DOUBLE_EQ(quantile(four, 0.0).value(), 1);
  EXPECT_DOUBLE_EQ(quantile(four, 1.0).value(), 4);

  std::vector<double> ten;
  for (int i = 10; i >= 1; --i) ten.push_back(i);
  EXPECT_DOUBLE_EQ(quantile(ten, 0.9).value(), 9.1);    // h = 8.1
  EXPECT_DOUBLE_EQ(quantile(ten, 0.99).value(), 9.91);  // h = 8.91
  EXPECT_DOUBLE_EQ(quantile(ten, 0.5).value(), 5.5);

  std::vector<double> sorted = ten;
  std::sort(sorted.begin(), sorted.end());
  EXPECT_DOUBLE_EQ(quantile_sorted(sorted, 0.9), 9.1);
  EXPECT_DOUBLE_EQ(quantile(std::vector<double>{7}, 0.99).value(), 7);

  EXPECT_FALSE(quantile(std::vector<double>{}, 0.5).ok());
  EXPECT_FALSE(quantile(std::vector<double>{1, NAN}, 0.5).ok());
}

TEST(Bootstrap, MedianOfLargeNormalSample) {
  std::mt19937_64 rng(7);
  std::normal_distribution<double> d(10, 2);
  std::vector<double> xs(2000);
  for (double& x : xs) x = d(rng);
  BootstrapOptions opt;
  opt.seed = 99;
  const Interval ci = bootstrap_quantile_ci(xs, 0.5, opt).value();
  EXPECT_TRUE(ci.contains(10)) << ci.low << " " << ci.high;
  EXPECT_TRUE(ci.contains(ci.estimate));
  // Asymptotic SE of a normal median: sqrt(pi/2) sigma / sqrt(n) = 0.0560; 95% width ~ 0.22.
  const double expected_width = 2 * 1.96 * std::sqrt(M_PI / 2) * 2 / std::sqrt(2000.0);
  EXPECT_GT(ci.high - ci.low, 0.7 * expected_width);
  EXPECT_LT(ci.high - ci.low, 1.3 * expected_width);

  // Deterministic in the seed.
  const Interval again = bootstrap_quantile_ci(xs, 0.5, opt).value();
  EXPECT_EQ(ci.low, again.low);
  EXPECT_EQ(ci.high, again.high);
  opt.seed = 100;
  const Interval other = bootstrap_quantile_ci(xs, 0.5, opt).value();
  EXPECT_TRUE(other.low != ci.low || other.high != ci.high);

  // Several quantiles at once agree in their estimates and are ordered.
  const double qs[] = {0.5, 0.9, 0.99};
  const std::vector<Interval> many = bootstrap_quantiles_ci(xs, qs, opt).value();
  ASSERT_EQ(many.size(), 3u);
  EXPECT_DOUBLE_EQ(many[0].estimate, ci.estimate);
  EXPECT_LT(many[0].estimate, many[1].estimate);
  EXPECT_LT(many[1].estimate, many[2].estimate);
  EXPECT_TRUE(many[1].contains(10 + 2 * 1.2816));  // the true p90
}

TEST(Bootstrap, MedianIntervalCoverageIsNearNominal) {
  // 200 experiments of n = 101 from N(0,1): the 95% interval should contain 0 about 190 times.
  // (The percentile bootstrap of a median is a bit conservative or liberal depending on n; the
  // band allows 88%..99%.)
  std::mt19937_64 rng(11);
  std::normal_distribution<double> d(0, 1);
  BootstrapOptions opt;
  opt.resamples = 500;
  int covered = 0;
  const int reps = 200;
  for (int r = 0; r < reps; ++r) {
    std::vector<double> xs(101);
    for (double& x : xs) x = d(rng);
    opt.seed = 1000 + r;
    if (bootstrap_quantile_ci(xs, 0.5, opt).value().contains(0)) ++covered;
  }
  EXPECT_GE(covered, 176);
  EXPECT_LE(covered, 198);
}

TEST(Bootstrap, RatioIntervalOfIdenticalArmsExcludesOneAtTheNominalRate) {
  // 200 pairs of identical lognormal arms (n = 200): the 95% interval of the p50 ratio should
  // exclude 1 about 10 times; binomial(200, 0.05) lies in [3, 20] with probability > 99%.
  std::mt19937_64 rng(31);
  BootstrapOptions opt;
  opt.resamples = 500;
  const double qs[] = {0.5};
  int excluded = 0;
  for (int r = 0; r < 200; ++r) {
    const std::vector<double> a = lognormal(rng, 200, 0.05, 0.4);
    const std::vector<double> b = lognormal(rng, 200, 0.05, 0.4);
    opt.seed = 5000 + r;
    if (!bootstrap_quantile_ratio_ci(a, b, qs, opt).value()[0].contains(1.0)) ++excluded;
  }
  EXPECT_GE(excluded, 3);
  EXPECT_LE(excluded, 20);
}

TEST(Bootstrap, RatioAndDifferenceOfKnownShift) {
  std::mt19937_64 rng(3);
  const std::vector<double> base = lognormal(rng, 2000, 0.010, 0.3);
  const std::vector<double> treat = lognormal(rng, 2000, 0.010, 0.3, 2.0);
  const double qs[] = {0.5, 0.99};
  const std::vector<Interval> ratio = bootstrap_quantile_ratio_ci(treat, base, qs).value();
  EXPECT_TRUE(ratio[0].contains(2.0)) << ratio[0].low << " " << ratio[0].high;
  EXPECT_FALSE(ratio[0].contains(1.0));
  EXPECT_TRUE(ratio[1].contains(2.0)) << ratio[1].low << " " << ratio[1].high;
  const std::vector<Interval> diff = bootstrap_quantile_difference_ci(treat, base, qs).value();
  EXPECT_TRUE(diff[0].contains(0.010)) << diff[0].low << " " << diff[0].high;

  // A ratio against a baseline whose median is 0 is refused.
  const std::vector<double> zeros(10, 0.0);
  EXPECT_FALSE(bootstrap_quantile_ratio_ci(treat, zeros, qs).ok());
  EXPECT_TRUE(bootstrap_quantile_difference_ci(treat, zeros, qs).ok());
}

// ---------------------------------------------------------------------------------------------
// Mann-Whitney
// ---------------------------------------------------------------------------------------------

TEST(MannWhitney, HandComputedSmallExample) {
  // Pooled and ranked: 11b 12b 16a 17b 19a 20b 22a 24a 29a -> R_a = 3+5+7+8+9 = 32,
  // U_a = 32 - 5*6/2 = 17, U_b = 20 - 17 = 3.
  const std::vector<double> a = {19, 22, 16, 29, 24};
  const std::vector<double> b = {20, 11, 17, 12};
  const MannWhitneyResult r = mann_whitney_u(a, b).value();
  EXPECT_DOUBLE_EQ(r.u_a, 17);
  EXPECT_DOUBLE_EQ(r.u_b, 3);
  EXPECT_TRUE(r.exact);
  // Exact: U_b <= 3 in 1+1+2+3 = 7 of C(9,4) = 126 arrangements (partitions of 0..3 into at
  // most 4 parts of size <= 5), two-sided p = 14/126.
  EXPECT_NEAR(r.p_value, 14.0 / 126.0, 1e-12);
  EXPECT_DOUBLE_EQ(r.common_language, 17.0 / 20.0);
  EXPECT_DOUBLE_EQ(r.rank_biserial, 0.7);
  // Swapping the samples swaps U and keeps p.
  const MannWhitneyResult s = mann_whitney_u(b, a).value();
  EXPECT_DOUBLE_EQ(s.u_a, 3);
  EXPECT_NEAR(s.p_value, r.p_value, 1e-12);

  // Normal approximation: E[U] = 10, Var[U] = 20*10/12, z = (7 - 0.5)/sqrt(16.667) = 1.5922.
  const MannWhitneyResult n = mann_whitney_u(a, b, MannWhitneyMethod::kNormal).value();
  EXPECT_FALSE(n.exact);
  EXPECT_NEAR(n.z, 1.5921683328, 1e-9);
  EXPECT_NEAR(n.p_value, 0.1113468865, 1e-9);

  // Complete separation of 3 and 3: one arrangement in C(6,3) = 20 per tail.
  const MannWhitneyResult sep =
      mann_whitney_u(std::vector<double>{1, 2, 3}, std::vector<double>{4, 5, 6}).value();
  EXPECT_DOUBLE_EQ(sep.u_a, 0);
  EXPECT_NEAR(sep.p_value, 0.1, 1e-12);
  EXPECT_DOUBLE_EQ(sep.rank_biserial, -1);
}

TEST(MannWhitney, TieCorrection) {
  // a = {1,2,2,3}, b = {2,3,3,4,5}; ranks 1, (2,3,4)->3, (5,6,7)->6, 8, 9.
  // R_a = 1+3+3+6 = 13, U_a = 13 - 10 = 3. Ties: two groups of 3 -> sum(t^3 - t) = 48.
  // Var = 20/12 * (10 - 48/(9*8)) = 15.5556, z = -(7 - 0.5)/3.9441 = -1.6481, p = 0.099342.
  const std::vector<double> a = {1, 2, 2, 3};
  const std::vector<double> b = {2, 3, 3, 4, 5};
  const MannWhitneyResult r = mann_whitney_u(a, b).value();
  EXPECT_TRUE(r.ties);
  EXPECT_FALSE(r.exact);  // ties: normal approximation
  EXPECT_DOUBLE_EQ(r.u_a, 3);
  EXPECT_NEAR(r.z, -1.6480507967, 1e-9);
  EXPECT_NEAR(r.p_value, 0.0993422479, 1e-9);
  EXPECT_DOUBLE_EQ(r.common_language, 0.15);
  EXPECT_FALSE(mann_whitney_u(a, b, MannWhitneyMethod::kExact).ok());

  // All values equal: no evidence.
  const MannWhitneyResult same =
      mann_whitney_u(std::vector<double>(5, 1.0), std::vector<double>(7, 1.0)).value();
  EXPECT_DOUBLE_EQ(same.p_value, 1);
  EXPECT_FALSE(mann_whitney_u(std::vector<double>{}, b).ok());
}

TEST(MannWhitney, ExactAndNormalAgreeForModerateSamples) {
  std::mt19937_64 rng(5);
  const std::vector<double> a = lognormal(rng, 30, 1, 0.5);
  const std::vector<double> b = lognormal(rng, 30, 1.3, 0.5);
  const double exact = mann_whitney_u(a, b, MannWhitneyMethod::kExact).value().p_value;
  const double normal = mann_whitney_u(a, b, MannWhitneyMethod::kNormal).value().p_value;
  EXPECT_NEAR(exact, normal, 0.01) << exact << " vs " << normal;
}

TEST(MannWhitney, IdenticalArmsRejectAtTheNominalRate) {
  // 400 experiments with two arms from one lognormal, n = 200 each: at alpha = 0.05 about 20
  // rejections; a binomial(400, 0.05) lies in [10, 32] with probability > 99%.
  std::mt19937_64 rng(2024);
  int rejected = 0;
  const int reps = 400;
  for (int r = 0; r < reps; ++r) {
    const std::vector<double> a = lognormal(rng, 200, 0.02, 0.6);
    const std::vector<double> b = lognormal(rng, 200, 0.02, 0.6);
    if (mann_whitney_u(a, b).value().p_value < 0.05) ++rejected;
  }
  EXPECT_GE(rejected, 10);
  EXPECT_LE(rejected, 32);

  // Small samples, exact distribution: never above the nominal rate (it is conservative, being
  // discrete), so at most the upper band.
  int small_rejected = 0;
  for (int r = 0; r < reps; ++r) {
    const std::vector<double> a = lognormal(rng, 8, 0.02, 0.6);
    const std::vector<double> b = lognormal(rng, 8, 0.02, 0.6);
    const MannWhitneyResult m = mann_whitney_u(a, b).value();
    ASSERT_TRUE(m.exact);
    if (m.p_value < 0.05) ++small_rejected;
  }
  EXPECT_LE(small_rejected, 32);
}

TEST(MannWhitney, KnownShiftIsFound) {
  std::mt19937_64 rng(8);
  const std::vector<double> base = lognormal(rng, 200, 0.02, 0.3);
  const std::vector<double> treat = lognormal(rng, 200, 0.02, 0.3, 2.0);
  const MannWhitneyResult r = mann_whitney_u(treat, base).value();
  EXPECT_LT(r.p_value, 1e-6);
  EXPECT_GT(r.z, 0);
  EXPECT_GT(r.common_language, 0.9);  // P(2X > Y) for log-sd 0.3: Phi(ln2 / (0.3 sqrt2)) = 0.95
}

// ---------------------------------------------------------------------------------------------
// Chi-square and SRM
// ---------------------------------------------------------------------------------------------

TEST(ChiSquare, TableValues) {
  EXPECT_NEAR(chi_square_sf(3.841, 1), 0.05, 2e-5);
  EXPECT_NEAR(chi_square_sf(5.991, 2), 0.05, 2e-5);
  EXPECT_NEAR(chi_square_sf(10.828, 1), 0.001, 2e-6);
  EXPECT_NEAR(chi_square_sf(6.635, 1), 0.01, 2e-5);
  EXPECT_NEAR(chi_square_sf(11.070, 5), 0.05, 2e-5);
  EXPECT_NEAR(chi_square_sf(18.307, 10), 0.05, 2e-5);
  EXPECT_NEAR(chi_square_sf(124.342, 100), 0.05, 2e-5);
  EXPECT_DOUBLE_EQ(chi_square_sf(0, 3), 1);
}

TEST(ChiSquare, ClosedForms) {
  for (double x : {0.01, 0.5, 1.0, 2.0, 4.0, 10.0, 30.0, 80.0}) {
    // dof 1: P(Z^2 >= x) = erfc(sqrt(x/2)); dof 2: exp(-x/2); dof 4: exp(-x/2)(1 + x/2).
    EXPECT_NEAR(chi_square_sf(x, 1) / std::erfc(std::sqrt(x / 2)), 1, 1e-10) << x;
    EXPECT_NEAR(chi_square_sf(x, 2) / std::exp(-x / 2), 1, 1e-10) << x;
    EXPECT_NEAR(chi_square_sf(x, 4) / (std::exp(-x / 2) * (1 + x / 2)), 1, 1e-10) << x;
    EXPECT_NEAR(regularized_gamma_p(1, x) + regularized_gamma_q(1, x), 1, 1e-14);
    EXPECT_NEAR(regularized_gamma_p(1, x), 1 - std::exp(-x), 1e-12);
  }
  EXPECT_NEAR(normal_sf(1.959963985), 0.025, 1e-9);
}

TEST(Srm, BalancedSplitIsFine) {
  const std::vector<std::uint64_t> obs = {500, 500};
  const std::vector<double> w = {1, 1};
  const SrmResult r = sample_ratio_mismatch(obs, w).value();
  EXPECT_DOUBLE_EQ(r.chi2, 0);
  EXPECT_EQ(r.dof, 1);
  EXPECT_DOUBLE_EQ(r.p_value, 1);
  EXPECT_FALSE(r.mismatch);
  EXPECT_DOUBLE_EQ(r.expected[0], 500);
}

TEST(Srm, SkewedSplitIsFlagged) {
  const std::vector<double> w = {1, 1};
  // 550/450: chi2 = 2 * 50^2/500 = 10, p = erfc(sqrt(5)) = 0.001565 -- just above the 0.001
  // SRM threshold, so it is not flagged at 0.001 but is at 0.01.
  const std::vector<std::uint64_t> mild = {550, 450};
  const SrmResult r = sample_ratio_mismatch(mild, w).value();
  EXPECT_NEAR(r.chi2, 10, 1e-12);
  EXPECT_NEAR(r.p_value, 0.0015654022580, 1e-12);
  EXPECT_FALSE(r.mismatch);
  EXPECT_TRUE(sample_ratio_mismatch(mild, w, 0.01).value().mismatch);
  // 560/440: chi2 = 14.4, p = 0.000148 < 0.001.
  const std::vector<std::uint64_t> skewed = {560, 440};
  const SrmResult s = sample_ratio_mismatch(skewed, w).value();
  EXPECT_NEAR(s.chi2, 14.4, 1e-12);
  EXPECT_NEAR(s.p_value, 0.000147802310, 1e-11);
  EXPECT_TRUE(s.mismatch);
  // Weights are relative: 25:75 is 1:3.
  const std::vector<std::uint64_t> quarter = {250, 750};
  EXPECT_FALSE(sample_ratio_mismatch(quarter, std::vector<double>{25, 75}).value().mismatch);
  EXPECT_TRUE(sample_ratio_mismatch(quarter, w).value().mismatch);
}

TEST(Srm, ThreeArms) {
  const std::vector<double> w = {1, 1, 1};
  const SrmResult fine =
      sample_ratio_mismatch(std::vector<std::uint64_t>{1010, 985, 1005}, w).value();
  EXPECT_EQ(fine.dof, 2);
  EXPECT_NEAR(fine.chi2, (100.0 + 225.0 + 25.0) / 1000.0, 1e-12);
  EXPECT_FALSE(fine.mismatch);
  // 1100/1000/900: chi2 = (100^2 + 0 + 100^2)/1000 = 20, dof 2: p = exp(-10) = 4.54e-5.
  const SrmResult skewed =
      sample_ratio_mismatch(std::vector<std::uint64_t>{1100, 1000, 900}, w).value();
  EXPECT_NEAR(skewed.chi2, 20, 1e-12);
  EXPECT_NEAR(skewed.p_value, std::exp(-10.0), 1e-15);
  EXPECT_TRUE(skewed.mismatch);
  // 2:1:1 weights with a matching split.
  EXPECT_FALSE(sample_ratio_mismatch(std::vector<std::uint64_t>{2000, 1000, 1000},
                                     std::vector<double>{2, 1, 1})
                   .value()
                   .mismatch);
  // A weight-0 arm is left out; units in it are an error.
  const SrmResult off =
      sample_ratio_mismatch(std::vector<std::uint64_t>{500, 500, 0}, std::vector<double>{1, 1, 0})
          .value();
  EXPECT_EQ(off.dof, 1);
  EXPECT_FALSE(
      sample_ratio_mismatch(std::vector<std::uint64_t>{500, 500, 3}, std::vector<double>{1, 1, 0})
          .ok());
  EXPECT_FALSE(sample_ratio_mismatch(std::vector<std::uint64_t>{500}, std::vector<double>{1}).ok());
}

TEST(MultipleComparisons, HolmAndBonferroni) {
  const std::vector<double> p = {0.01, 0.04, 0.03};
  const std::vector<double> holm = holm_adjust(p);
  EXPECT_DOUBLE_EQ(holm[0], 0.03);  // 3 * 0.01
  EXPECT_DOUBLE_EQ(holm[2], 0.06);  // 2 * 0.03
  EXPECT_DOUBLE_EQ(holm[1], 0.06);  // max(1 * 0.04, 0.06): monotone
  const std::vector<double> bonf = bonferroni_adjust(p);
  EXPECT_DOUBLE_EQ(bonf[0], 0.03);
  EXPECT_DOUBLE_EQ(bonf[1], 0.12);
  EXPECT_NEAR(bonf[2], 0.09, 1e-15);
  EXPECT_DOUBLE_EQ(holm_adjust(std::vector<double>{0.6, 0.7})[1], 1.0);
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

constexpr double kGuest = 1024.0 * 1024 * 1024;

void add_arm(std::vector<OperationRecord>& out, const std::string& arm, std::size_t units,
             const std::vector<double>& pause, const std::vector<double>& resume,
             const std::vector<double>& peak, double released) {
  // Two operations per sandbox (unit): the SRM check counts units, not operations.
  for (std::size_t i = 0; i < pause.size(); ++i) {
    OperationRecord r;
    r.arm = arm;
    r.unit = arm + "-sb" + std::to_string(i % units);
    r.metrics["pause_seconds"] = pause[i];
    r.metrics["resume_seconds"] = resume[i];
    r.metrics["peak_memory_bytes"] = peak[i];
    r.metrics["released_bytes"] = released;
    r.metrics["guest_memory_bytes"] = kGuest;
    out.push_back(std::move(r));
  }
}

ExperimentSpec spec_for(std::vector<ArmWeight> arms, std::string baseline) {
  ExperimentSpec spec;
  spec.title = "pause strategies <A/B/C> & more";  // exercises escaping
  spec.arms = std::move(arms);
  spec.baseline = std::move(baseline);
  return spec;
}

TEST(Report, KnownTwoXShift) {
  // treatment = 2 x draws from the baseline's distribution: p50 ratio 2.0.
  std::mt19937_64 rng(42);
  const std::size_t n = 3000;
  std::vector<OperationRecord> records;
  const auto peak = lognormal(rng, n, 3e8, 0.1);
  add_arm(records, "process_vm_readv", n / 2, lognormal(rng, n, 0.05, 0.3),
          lognormal(rng, n, 0.02, 0.3), peak, 0);
  add_arm(records, "slowpoke", n / 2, lognormal(rng, n, 0.05, 0.3, 2.0),
          lognormal(rng, n, 0.02, 0.3), peak, 0);
  ExperimentSpec spec = spec_for({{"process_vm_readv", 1}, {"slowpoke", 1}}, "process_vm_readv");
  spec.metrics = {metric_spec_for("pause_seconds"), metric_spec_for("resume_seconds")};
  const Report report = build_report(records, spec).value();
  ASSERT_EQ(report.metrics.size(), 2u);
  const Comparison* pause = nullptr;
  for (const Comparison& c : report.comparisons) {
    if (report.metrics[c.metric].name == "pause_seconds") pause = &c;
  }
  ASSERT_NE(pause, nullptr);
  EXPECT_EQ(pause->mode, CompareMode::kRatio);
  EXPECT_TRUE(pause->p50.contains(2.0)) << pause->p50.low << " " << pause->p50.high;
  EXPECT_FALSE(pause->p50.contains(1.0));
  EXPECT_TRUE(pause->p99.contains(2.0)) << pause->p99.low << " " << pause->p99.high;
  EXPECT_LT(pause->mann_whitney.p_value, 0.001);
  EXPECT_EQ(pause->outcome, Outcome::kWorse);
  EXPECT_NE(pause->verdict.find("slowpoke pauses are 2.0x slower than process_vm_readv"),
            std::string::npos)
      << pause->verdict;
  EXPECT_NE(pause->verdict.find("p<0.001"), std::string::npos) << pause->verdict;
  EXPECT_FALSE(report.srm.mismatch);
  ASSERT_FALSE(report.winners.empty());
  EXPECT_EQ(report.winners[0].arm, "process_vm_readv");
  EXPECT_TRUE(report.winners[0].clear) << report.winners[0].text;
}

TEST(Report, ThreeStrategiesVerdictsAndOutputs) {
  std::mt19937_64 rng(77);
  const std::size_t n = 600;
  std::vector<OperationRecord> records;
  // Baseline.
  const std::vector<double> base_pause = lognormal(rng, n, 0.080, 0.25);
  const std::vector<double> base_resume = lognormal(rng, n, 0.030, 0.25);
  add_arm(records, "process_vm_readv", n / 2, base_pause, base_resume, lognormal(rng, n, 3e8, 0.1),
          0);
  // memfd: pauses 1.6x faster, more peak memory (it keeps the memfd), and the baseline's resume
  // times in another order (so "no difference" is the right answer whatever the seed: a fresh
  // draw would make the 95% interval exclude 1 in 5% of seeds).
  std::vector<double> memfd_resume_times = base_resume;
  std::shuffle(memfd_resume_times.begin(), memfd_resume_times.end(), rng);
  add_arm(records, "memfd", n / 2, lognormal(rng, n, 0.080, 0.25, 1 / 1.6), memfd_resume_times,
          lognormal(rng, n, 1.3e9, 0.05), 0);
  // hole_punch: the same p50 pause but its slowest 20% take 1.4x as long (p99 +40%); releases
  // all guest memory.
  std::vector<double> hp_pause = lognormal(rng, n, 0.080, 0.25);
  const double cut = 0.080 * std::exp(0.25 * 0.8416);  // the 80th percentile
  for (double& x : hp_pause) {
    if (x > cut) x *= 1.4;
  }
  add_arm(records, "hole_punch", n / 2, hp_pause, lognormal(rng, n, 0.030, 0.25),
          lognormal(rng, n, 3e8, 0.1), kGuest);

  const ExperimentSpec spec =
      spec_for({{"process_vm_readv", 1}, {"memfd", 1}, {"hole_punch", 1}}, "process_vm_readv");
  const Report report = build_report(records, spec).value();

  auto find = [&](const std::string& arm, const std::string& metric) -> const Comparison& {
    for (const Comparison& c : report.comparisons) {
      if (c.arm == arm && report.metrics[c.metric].name == metric) return c;
    }
    ADD_FAILURE() << "no comparison " << arm << " " << metric;
    return report.comparisons.front();
  };
  const Comparison& memfd_pause = find("memfd", "pause_seconds");
  EXPECT_EQ(memfd_pause.outcome, Outcome::kBetter);
  EXPECT_TRUE(memfd_pause.p50.contains(1 / 1.6));
  EXPECT_NE(memfd_pause.verdict.find("memfd pauses are 1.6x faster than process_vm_readv (p50, "
                                     "95% CI "),
            std::string::npos)
      << memfd_pause.verdict;
  const Comparison& memfd_resume = find("memfd", "resume_seconds");
  EXPECT_EQ(memfd_resume.outcome, Outcome::kNoDifference) << memfd_resume.verdict;
  EXPECT_NE(memfd_resume.verdict.find("no significant difference in resume latency between memfd "
                                      "and process_vm_readv"),
            std::string::npos)
      << memfd_resume.verdict;
  EXPECT_EQ(find("memfd", "peak_memory_bytes").outcome, Outcome::kWorse);

  const Comparison& hp_pause_c = find("hole_punch", "pause_seconds");
  EXPECT_EQ(hp_pause_c.p99_outcome, Outcome::kWorse) << hp_pause_c.p99_verdict;
  EXPECT_TRUE(hp_pause_c.p99.contains(1.4)) << hp_pause_c.p99.low << " " << hp_pause_c.p99.high;
  EXPECT_TRUE(hp_pause_c.p50.contains(1.0));
  const Comparison& hp_released = find("hole_punch", "released_fraction");
  EXPECT_EQ(hp_released.mode, CompareMode::kDifference);
  EXPECT_EQ(hp_released.outcome, Outcome::kBetter);
  EXPECT_DOUBLE_EQ(hp_released.p50.estimate, 1.0);
  EXPECT_EQ(find("memfd", "released_fraction").outcome, Outcome::kNoDifference);

  // Summary: hole_punch's trade-off in one sentence.
  std::string hp_summary;
  for (const std::string& s : report.summary) {
    if (s.rfind("hole_punch", 0) == 0) hp_summary = s;
  }
  EXPECT_NE(hp_summary.find("releases 100% of guest memory"), std::string::npos) << hp_summary;
  EXPECT_NE(hp_summary.find("at the cost of"), std::string::npos) << hp_summary;
  EXPECT_NE(hp_summary.find("pause p99"), std::string::npos) << hp_summary;

  // Winners: memfd for pause latency, none for resume latency.
  for (const Winner& w : report.winners) {
    const std::string& metric = report.metrics[w.metric].name;
    if (metric == "pause_seconds") {
      EXPECT_EQ(w.arm, "memfd");
      EXPECT_TRUE(w.clear) << w.text;
    }
    if (metric == "resume_seconds") {
      EXPECT_FALSE(w.clear) << w.text;
      EXPECT_NE(w.text.find("no clear winner"), std::string::npos);
    }
  }
  // guest_memory_bytes is context, not compared.
  for (const MetricSpec& m : report.metrics) EXPECT_NE(m.name, "guest_memory_bytes");

  // Units: two records per sandbox.
  for (const ArmSummary& a : report.arms) {
    EXPECT_EQ(a.records, n);
    EXPECT_EQ(a.units, n / 2);
  }
  EXPECT_FALSE(report.srm.mismatch);
  EXPECT_EQ(report.srm.dof, 2);

  // JSON.
  const nlohmann::json j = to_json(report);
  EXPECT_EQ(j["baseline"], "process_vm_readv");
  ASSERT_EQ(j["arms"].size(), 3u);
  EXPECT_EQ(j["arms"][1]["name"], "memfd");
  EXPECT_TRUE(j["arms"][0]["baseline"].get<bool>());
  EXPECT_TRUE(j["arms"][2]["metrics"].contains("pause_seconds"));
  EXPECT_GT(j["arms"][2]["metrics"]["pause_seconds"]["p99"]["high"].get<double>(), 0);
  EXPECT_EQ(j["comparisons"].size(), report.comparisons.size());
  EXPECT_FALSE(j["srm"]["mismatch"].get<bool>());
  bool has_memfd_verdict = false;
  for (const auto& v : j["verdicts"]) {
    if (v.get<std::string>() == memfd_pause.verdict) has_memfd_verdict = true;
  }
  EXPECT_TRUE(has_memfd_verdict);
  // Round trip through text.
  EXPECT_EQ(nlohmann::json::parse(j.dump()), j);

  // Markdown.
  const std::string md = to_markdown(report);
  for (const char* arm : {"process_vm_readv", "memfd", "hole_punch"}) {
    EXPECT_NE(md.find(arm), std::string::npos) << arm;
  }
  EXPECT_NE(md.find("Baseline: **process_vm_readv**"), std::string::npos);
  EXPECT_NE(md.find("- " + memfd_pause.verdict), std::string::npos);
  EXPECT_NE(md.find("- " + hp_summary), std::string::npos);
  EXPECT_NE(md.find("sample ratio OK"), std::string::npos);
  EXPECT_NE(md.find("| arm | n | mean | p50 [95% CI]"), std::string::npos);
}

TEST(Report, SkewedSplitIsAMismatch) {
  std::mt19937_64 rng(9);
  std::vector<OperationRecord> records;
  const auto pause = lognormal(rng, 1000, 0.05, 0.3);
  const auto resume = lognormal(rng, 1000, 0.02, 0.3);
  const auto peak = lognormal(rng, 1000, 3e8, 0.1);
  // 600 vs 400 sandboxes for a 50/50 flag: chi2 = 40.
  add_arm(records, "a", 600, std::vector<double>(pause.begin(), pause.begin() + 600),
          std::vector<double>(resume.begin(), resume.begin() + 600),
          std::vector<double>(peak.begin(), peak.begin() + 600), 0);
  add_arm(records, "b", 400, std::vector<double>(pause.begin() + 600, pause.end()),
          std::vector<double>(resume.begin() + 600, resume.end()),
          std::vector<double>(peak.begin() + 600, peak.end()), 0);
  ExperimentSpec spec = spec_for({{"a", 50}, {"b", 50}}, "a");
  spec.bootstrap.resamples = 200;  // the split is the point here
  const Report r = build_report(records, spec).value();
  EXPECT_TRUE(r.srm.mismatch);
  EXPECT_NEAR(r.srm.chi2, 40, 1e-9);
  EXPECT_NE(r.srm_text.find("SAMPLE RATIO MISMATCH"), std::string::npos);
  EXPECT_NE(to_markdown(r).find("SAMPLE RATIO MISMATCH"), std::string::npos);
  EXPECT_TRUE(to_json(r)["srm"]["mismatch"].get<bool>());
  // Same data, weights 60/40: fine.
  spec.arms = {{"a", 60}, {"b", 40}};
  EXPECT_FALSE(build_report(records, spec).value().srm.mismatch);
}

TEST(Report, RejectsBadInput) {
  std::vector<OperationRecord> records = {{"x", "", {{"pause_seconds", 1}}},
                                          {"y", "", {{"pause_seconds", 2}}}};
  EXPECT_FALSE(build_report(records, spec_for({{"x", 1}, {"y", 1}}, "z")).ok());
  EXPECT_FALSE(build_report(records, spec_for({{"x", 1}}, "x")).ok());
  EXPECT_FALSE(build_report(records, spec_for({{"x", 1}, {"w", 1}}, "x")).ok());  // y unknown
  EXPECT_FALSE(build_report({}, spec_for({{"x", 1}, {"y", 1}}, "x")).ok());
  EXPECT_TRUE(build_report(records, spec_for({{"x", 1}, {"y", 1}}, "x")).ok());
}

TEST(Report, RecordsFromJson) {
  const auto j = nlohmann::json::parse(R"([
    {"arm": "memfd", "unit": "sb-1", "metrics": {"pause_seconds": 0.5, "note": "x"}},
    {"arm": "process_vm_readv", "sandbox": 7, "pause_seconds": 0.8, "strategy": "pvr"}
  ])");
  const std::vector<OperationRecord> r = records_from_json(j).value();
  ASSERT_EQ(r.size(), 2u);
  EXPECT_EQ(r[0].arm, "memfd");
  EXPECT_EQ(r[0].unit, "sb-1");
  EXPECT_EQ(r[0].metrics.size(), 1u);
  EXPECT_DOUBLE_EQ(r[0].metrics.at("pause_seconds"), 0.5);
  EXPECT_EQ(r[1].unit, "7");
  EXPECT_EQ(r[1].metrics.size(), 1u);
  EXPECT_DOUBLE_EQ(r[1].metrics.at("pause_seconds"), 0.8);
  EXPECT_FALSE(records_from_json(nlohmann::json::parse(R"([{"metrics": {}}])")).ok());
  EXPECT_FALSE(records_from_json(nlohmann::json::object()).ok());
}

TEST(Format, Values) {
  EXPECT_EQ(format_value(Unit::kSeconds, 0.0012), "1.20 ms");
  EXPECT_EQ(format_value(Unit::kSeconds, 0.000850), "850 us");
  EXPECT_EQ(format_value(Unit::kSeconds, 3.4), "3.40 s");
  EXPECT_EQ(format_value(Unit::kBytes, 512.0 * 1024 * 1024), "512 MiB");
  EXPECT_EQ(format_value(Unit::kFraction, 1.0), "100%");
  EXPECT_EQ(format_p(0.0004), "p<0.001");
  EXPECT_EQ(format_p(0.43), "p=0.43");
  EXPECT_EQ(format_p(0.0043), "p=0.004");
}

// ---------------------------------------------------------------------------------------------
// SVG
// ---------------------------------------------------------------------------------------------

// A minimal XML well-formedness check: properly nested and closed elements, quoted attributes,
// one root, only the five predefined entities (or numeric ones). Returns "" or the problem.
// Fills root_attrs with the root element's attribute names.
std::string check_xml(const std::string& s, std::string& root_name,
                      std::vector<std::string>& root_attrs) {
  std::vector<std::string> stack;
  int roots = 0;
  std::size_t i = 0;
  auto is_name = [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == ':' ||
           c == '.';
  };
  auto check_entities = [](const std::string& text) -> std::string {
    for (std::size_t k = text.find('&'); k != std::string::npos; k = text.find('&', k + 1)) {
      const std::size_t semi = text.find(';', k);
      if (semi == std::string::npos) return "unterminated entity";
      const std::string ent = text.substr(k + 1, semi - k - 1);
      if (ent != "amp" && ent != "lt" && ent != "gt" && ent != "quot" && ent != "apos" &&
          (ent.empty() || ent[0] != '#')) {
        return "unknown entity &" + ent + ";";
      }
    }
    return "";
  };
  while (i < s.size()) {
    if (s[i] != '<') {
      const std::size_t next = s.find('<', i);
      const std::string text =
          s.substr(i, next == std::string::npos ? std::string::npos : next - i);
      if (text.find('>') != std::string::npos) return "raw '>' in text";
      if (std::string e = check_entities(text); !e.empty()) return e;
      if (stack.empty() && text.find_first_not_of(" \t\r\n") != std::string::npos) {
        return "text outside the root";
      }
      if (next == std::string::npos) break;
      i = next;
      continue;
    }
    if (s.compare(i, 5, "<?xml") == 0) {
      const std::size_t end = s.find("?>", i);
      if (end == std::string::npos || i != 0) return "bad xml declaration";
      i = end + 2;
      continue;
    }
    if (s.compare(i, 4, "<!--") == 0) {
      const std::size_t end = s.find("-->", i);
      if (end == std::string::npos) return "unterminated comment";
      i = end + 3;
      continue;
    }
    if (s.compare(i, 2, "</") == 0) {
      std::size_t k = i + 2;
      std::string name;
      while (k < s.size() && is_name(s[k])) name += s[k++];
      while (k < s.size() && std::isspace(static_cast<unsigned char>(s[k]))) ++k;
      if (k >= s.size() || s[k] != '>') return "bad end tag " + name;
      if (stack.empty() || stack.back() != name) return "mismatched end tag " + name;
      stack.pop_back();
      i = k + 1;
      continue;
    }
    std::size_t k = i + 1;
    std::string name;
    while (k < s.size() && is_name(s[k])) name += s[k++];
    if (name.empty()) return "empty tag name";
    std::vector<std::string> attrs;
    for (;;) {
      while (k < s.size() && std::isspace(static_cast<unsigned char>(s[k]))) ++k;
      if (k >= s.size()) return "unterminated tag " + name;
      if (s[k] == '>' || s.compare(k, 2, "/>") == 0) break;
      std::string attr;
      while (k < s.size() && is_name(s[k])) attr += s[k++];
      if (attr.empty() || k >= s.size() || s[k] != '=') return "bad attribute in " + name;
      ++k;
      if (k >= s.size() || (s[k] != '"' && s[k] != '\'')) return "unquoted attribute " + attr;
      const char quote = s[k++];
      const std::size_t end = s.find(quote, k);
      if (end == std::string::npos) return "unterminated attribute " + attr;
      const std::string value = s.substr(k, end - k);
      if (value.find('<') != std::string::npos) return "'<' in attribute " + attr;
      if (std::string e = check_entities(value); !e.empty()) return e;
      if (std::find(attrs.begin(), attrs.end(), attr) != attrs.end()) {
        return "duplicate attribute " + attr;
      }
      attrs.push_back(attr);
      k = end + 1;
    }
    const bool self_closing = s[k] == '/';
    if (stack.empty()) {
      if (++roots > 1) return "more than one root";
      root_name = name;
      root_attrs = attrs;
    }
    if (!self_closing) stack.push_back(name);
    i = k + (self_closing ? 2 : 1);
  }
  if (!stack.empty()) return "unclosed " + stack.back();
  if (roots != 1) return "no root";
  return "";
}

TEST(Svg, WellFormedWithEveryStrategy) {
  std::mt19937_64 rng(5);
  std::vector<OperationRecord> records;
  const std::size_t n = 500;  // more than max_points: the thinned curve path is exercised
  add_arm(records, "process_vm_readv", n, lognormal(rng, n, 0.08, 0.3),
          lognormal(rng, n, 0.03, 0.3), lognormal(rng, n, 3e8, 0.1), 0);
  add_arm(records, "memfd", n, lognormal(rng, n, 0.05, 0.3), lognormal(rng, n, 0.03, 0.3),
          lognormal(rng, n, 1.3e9, 0.05), 0);
  add_arm(records, "hole_punch & <friends>", n, lognormal(rng, 40, 0.08, 0.3),  // small arm
          lognormal(rng, 40, 0.03, 0.3), lognormal(rng, 40, 3e8, 0.1), kGuest);
  ExperimentSpec spec =
      spec_for({{"process_vm_readv", 1}, {"memfd", 1}, {"hole_punch & <friends>", 0.08}},
               "process_vm_readv");
  const Report report = build_report(records, spec).value();
  const std::string svg = render_svg(report);

  std::string root;
  std::vector<std::string> attrs;
  EXPECT_EQ(check_xml(svg, root, attrs), "");
  EXPECT_EQ(root, "svg");
  for (const char* a : {"width", "height", "viewBox", "xmlns"}) {
    EXPECT_NE(std::find(attrs.begin(), attrs.end(), a), attrs.end()) << a;
  }
  EXPECT_NE(svg.find("process_vm_readv"), std::string::npos);
  EXPECT_NE(svg.find("memfd"), std::string::npos);
  EXPECT_NE(svg.find("hole_punch &amp; &lt;friends&gt;"), std::string::npos);
  EXPECT_EQ(svg.find("<friends>"), std::string::npos);  // never raw
  EXPECT_NE(svg.find("pause latency"), std::string::npos);
  EXPECT_NE(svg.find("resume latency"), std::string::npos);
  EXPECT_NE(svg.find("peak memory per strategy"), std::string::npos);
  EXPECT_NE(svg.find("<polyline"), std::string::npos);
  EXPECT_NE(svg.find("<rect"), std::string::npos);

  // The checker itself catches broken documents.
  EXPECT_NE(check_xml("<svg><g></svg>", root, attrs), "");
  EXPECT_NE(check_xml("<svg a=1></svg>", root, attrs), "");
  EXPECT_NE(check_xml("<svg><text>a & b</text></svg>", root, attrs), "");
}

TEST(Svg, NoPeakMemoryStillRenders) {
  std::vector<OperationRecord> records;
  for (int i = 0; i < 20; ++i) {
    records.push_back({"x", "", {{"pause_seconds", 0.01 * (1 + i)}}});
    records.push_back({"y", "", {{"pause_seconds", 0.02 * (1 + i)}}});
  }
  const Report report = build_report(records, spec_for({{"x", 1}, {"y", 1}}, "x")).value();
  const std::string svg = render_svg(report);
  std::string root;
  std::vector<std::string> attrs;
  EXPECT_EQ(check_xml(svg, root, attrs), "");
  EXPECT_NE(svg.find("no peak_memory_bytes measured"), std::string::npos);
}

// A pause-mode experiment (memsnap experiment run --split pause-mode): the arms are copy and
// handover, and each pause has two latencies, its answer and its durable snapshot. Handover
// answers 25x sooner and is durable 1.5x later: both latencies come out per arm, compared with
// the baseline in the right direction, in the Markdown, the JSON and the picture.
TEST(Report, PauseModeArmsShowAnswerAndDurableLatencies) {
  std::mt19937_64 rng(19);
  const std::size_t n = 200;
  std::vector<OperationRecord> records;
  auto add = [&](const std::string& arm, double answer, double durable, double cpu) {
    const auto a = lognormal(rng, n, answer, 0.25);
    const auto d = lognormal(rng, n, durable, 0.25);
    const auto c = lognormal(rng, n, cpu, 0.25);
    for (std::size_t i = 0; i < n; ++i) {
      OperationRecord r;
      r.arm = arm;
      r.unit = arm + "-sb" + std::to_string(i % 20);
      // A copy pause answers when it is durable.
      r.metrics["answer_seconds"] = a[i];
      r.metrics["answer_wall_seconds"] = a[i] + 0.003;
      r.metrics["durable_seconds"] = arm == "copy" ? a[i] : d[i];
      r.metrics["export_cpu_seconds"] = c[i];
      r.metrics["resume_seconds"] = 0.001;
      records.push_back(std::move(r));
    }
  };
  add("copy", 0.050, 0.050, 0.020);
  add("handover", 0.002, 0.075, 0.030);
  ExperimentSpec spec = spec_for({{"copy", 1}, {"handover", 1}}, "copy");
  spec.arm_kind = "pause mode";
  const Report report = build_report(records, spec).value();

  std::vector<std::string> names;
  for (const MetricSpec& m : report.metrics) names.push_back(m.name);
  EXPECT_EQ(names, (std::vector<std::string>{"answer_seconds", "answer_wall_seconds",
                                             "durable_seconds", "resume_seconds",
                                             "export_cpu_seconds"}));
  auto index = [&](const std::string& name) {
    return static_cast<std::size_t>(std::find(names.begin(), names.end(), name) - names.begin());
  };
  const std::size_t answer = index("answer_seconds");
  const std::size_t durable = index("durable_seconds");
  ASSERT_EQ(report.arms.size(), 2u);
  for (const ArmSummary& a : report.arms) {
    EXPECT_EQ(a.metrics[answer].n, n) << a.name;
    EXPECT_EQ(a.metrics[durable].n, n) << a.name;
  }
  EXPECT_TRUE(report.arms[1].metrics[answer].p50.contains(0.002));
  EXPECT_TRUE(report.arms[1].metrics[durable].p50.contains(0.075));
  EXPECT_TRUE(report.arms[0].metrics[durable].p50.contains(0.050));

  auto find = [&](std::size_t metric) -> const Comparison* {
    for (const Comparison& c : report.comparisons) {
      if (c.metric == metric && c.arm == "handover") return &c;
    }
    return nullptr;
  };
  const Comparison* a = find(answer);
  const Comparison* d = find(durable);
  ASSERT_NE(a, nullptr);
  ASSERT_NE(d, nullptr);
  EXPECT_EQ(a->baseline, "copy");
  EXPECT_EQ(a->outcome, Outcome::kBetter) << a->verdict;
  EXPECT_TRUE(a->p50.contains(0.04)) << a->p50.low << " " << a->p50.high;
  EXPECT_EQ(a->verdict.rfind("handover pauses answer ", 0), 0u) << a->verdict;
  EXPECT_NE(a->verdict.find("x sooner than copy (p50"), std::string::npos) << a->verdict;
  EXPECT_EQ(d->outcome, Outcome::kWorse) << d->verdict;
  EXPECT_TRUE(d->p50.contains(1.5)) << d->p50.low << " " << d->p50.high;
  EXPECT_EQ(d->verdict.rfind("handover snapshots are durable ", 0), 0u) << d->verdict;
  EXPECT_NE(d->verdict.find("x later than copy (p50"), std::string::npos) << d->verdict;
  ASSERT_EQ(report.summary.size(), 1u);
  EXPECT_NE(report.summary[0].find("answer p50"), std::string::npos) << report.summary[0];
  EXPECT_NE(report.summary[0].find("at the cost of"), std::string::npos) << report.summary[0];
  EXPECT_NE(report.summary[0].find("durable p50"), std::string::npos) << report.summary[0];

  // Markdown: a table per latency, with a row of each arm.
  const std::string md = to_markdown(report);
  for (const char* heading : {"### pause answer latency (`answer_seconds`)",
                              "### pause durable latency (`durable_seconds`)"}) {
    const auto at = md.find(heading);
    ASSERT_NE(at, std::string::npos) << heading << "\n" << md;
    const std::string table = md.substr(at, md.find("\n###", at + 1) - at);
    EXPECT_NE(table.find("| copy (baseline) | 200 |"), std::string::npos) << table;
    EXPECT_NE(table.find("| handover | 200 |"), std::string::npos) << table;
  }
  // JSON: both latencies of both arms.
  const nlohmann::json j = to_json(report);
  for (const auto& arm : j["arms"]) {
    for (const char* m : {"answer_seconds", "answer_wall_seconds", "durable_seconds"}) {
      ASSERT_TRUE(arm["metrics"].contains(m)) << arm["name"] << " " << m;
      EXPECT_EQ(arm["metrics"][m]["n"], n) << arm["name"] << " " << m;
    }
  }
  // The picture: an ECDF panel per latency, per pause mode.
  const std::string svg = render_svg(report);
  std::string root;
  std::vector<std::string> attrs;
  EXPECT_EQ(check_xml(svg, root, attrs), "");
  for (const char* panel : {"<g id=\"ecdf-answer_seconds\">", "<g id=\"ecdf-durable_seconds\">",
                            "pause answer latency: ECDF per pause mode",
                            "pause durable latency: ECDF per pause mode"}) {
    EXPECT_NE(svg.find(panel), std::string::npos) << panel;
  }
  EXPECT_EQ(svg.find("per strategy"), std::string::npos);
}

}  // namespace
}  // namespace memsnap::experiment
