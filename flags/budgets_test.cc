// Budgets (flags/budgets.h, issue 26 item 6): small flag files whose YAML aliases, $refs or
// JsonLogic would take minutes and gigabytes are refused at their budget, with a located
// diagnostic (loading) or an ERROR resolution with the caller's default (evaluation); a reload
// of such a file keeps the last good flags. Every bomb here would take hours or exhaust memory
// without its budget; no timing is asserted, only that the refusal happens.
#include <gtest/gtest.h>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "flags/budgets.h"
#include "flags/flag_set.h"
#include "flags/flag_store.h"
#include "flags/jsonlogic.h"

namespace memsnap::flags {
namespace {

bool has(const LoadResult& r, const std::string& text) {
  for (const auto& d : r.diagnostics) {
    if (d.to_string().find(text) != std::string::npos) return true;
  }
  return false;
}

// 9 levels of 10 aliases each: 10^9 values once expanded, from 600 bytes.
std::string yaml_alias_bomb() {
  std::string text = "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n";
  for (int i = 1; i < 9; ++i) {
    const std::string prev = "*a" + std::to_string(i - 1);
    text += "a" + std::to_string(i) + ": &a" + std::to_string(i) + " [";
    for (int k = 0; k < 10; ++k) text += (k == 0 ? "" : ", ") + prev;
    text += "]\n";
  }
  text += "flags: {f: {state: ENABLED, variants: {on: true}, defaultVariant: on}}\n";
  return text;
}

// 50 evaluators, each using the next twice: inlined, 2^50 nodes; evaluated, 2^50 operations.
std::string ref_chain_bomb() {
  std::string text = R"({"$evaluators": {)";
  for (int i = 0; i < 50; ++i) {
    const std::string next = "e" + std::to_string(i + 1);
    text += "\"e" + std::to_string(i) + R"(": {"or": [{"$ref": ")" + next + R"("}, {"$ref": ")" +
            next + "\"}]},\n";
  }
  text += R"("e50": {"==": [1, 2]}},
  "flags": {"bomb": {"state": "ENABLED", "variants": {"on": true, "off": false},
                     "defaultVariant": "off", "targeting": {"if": [{"$ref": "e0"}, "on", "off"]}}}})";
  return text;
}

// reduce over 64 elements whose step is `step` (an operation on the accumulator).
std::string reduce_bomb(const std::string& step, const std::string& initial) {
  std::string list = "[";
  for (int i = 0; i < 64; ++i) list += (i == 0 ? "" : ",") + std::to_string(i);
  list += "]";
  return R"({"flags": {"bomb": {"state": "ENABLED", "variants": {"a": "a", "b": "b"},
    "defaultVariant": "a", "targeting": {"if": [{"reduce": [)" +
         list + ", " + step + ", " + initial + R"(]}, "b", "a"]}}}})";
}

void expect_over_budget(const LoadResult& r, const std::string& flag) {
  ASSERT_TRUE(r.ok()) << r.error_text();
  for (const bool explain : {false, true}) {
    EvalOptions options;
    options.explain = explain;
    const Resolution res =
        r.flags->evaluate(flag, {{"targetingKey", "sb-1"}}, std::nullopt, "caller-default", options);
    EXPECT_EQ(res.reason, Reason::kError);
    EXPECT_EQ(res.error_code, ErrorCode::kGeneral);
    EXPECT_EQ(res.value, "caller-default");
    EXPECT_NE(res.error_message.find("budget"), std::string::npos) << res.error_message;
  }
}

TEST(Budgets, YamlAliasBombIsRefusedWhereItCrossesTheBudget) {
  const std::string text = yaml_alias_bomb();
  ASSERT_LT(text.size(), 1024U);
  const LoadResult r = load_flag_text(text, "bomb.yaml", {.strict = true});
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(has(r, "bomb.yaml:")) << r.error_text();
  EXPECT_TRUE(has(r, "more than " + std::to_string(kMaxDocumentNodes) + " values"))
      << r.error_text();
}

TEST(Budgets, JsonDocumentsHaveTheSameValueBudget) {
  std::string text = "{\"flags\": {},\n \"data\": [0";
  for (std::size_t i = 0; i < kMaxDocumentNodes; ++i) text += ",0";
  text += "]}";
  const LoadResult r = load_flag_text(text, "big.json", {.strict = true});
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(has(r, "big.json:2:")) << r.error_text();
  EXPECT_TRUE(has(r, "more than " + std::to_string(kMaxDocumentNodes) + " values"))
      << r.error_text();
}

TEST(Budgets, AliasesWithinTheBudgetStillLoad) {
  const LoadResult r = load_flag_text(
      "base: &on {state: ENABLED, variants: {on: true, off: false}, defaultVariant: on}\n"
      "flags: {a: *on, b: *on}\n",
      "ok.yaml", {.strict = true});
  ASSERT_TRUE(r.ok()) << r.error_text();
  EXPECT_EQ(r.flags->evaluate("b", {}, FlagType::kBoolean, false).value, true);
}

TEST(Budgets, RefChainCompilesOnceAndItsEvaluationStopsAtTheStepBudget) {
  const std::string text = ref_chain_bomb();
  ASSERT_LT(text.size(), 4096U);
  const LoadResult r = load_flag_text(text, "chain.json", {.strict = true});
  expect_over_budget(r, "bomb");
}

TEST(Budgets, SharedRefsEvaluateAsInlinedOnes) {
  const LoadResult r = load_flag_text(R"({"$evaluators": {
      "big": {">=": [{"var": "memory_mib"}, 4096]},
      "either": {"or": [{"$ref": "big"}, {"==": [{"var": "team"}, "infra"]}]}},
    "flags": {
      "a": {"state": "ENABLED", "variants": {"y": "y", "n": "n"}, "defaultVariant": "n",
            "targeting": {"if": [{"$ref": "either"}, "y", "n"]}},
      "b": {"state": "ENABLED", "variants": {"y": "y", "n": "n"}, "defaultVariant": "n",
            "targeting": {"if": [{"and": [{"$ref": "big"}, {"$ref": "either"}]}, "y", "n"]}}}})",
                                      "refs.json", {.strict = true});
  ASSERT_TRUE(r.ok()) << r.error_text();
  EXPECT_EQ(r.flags->evaluate("a", {{"team", "infra"}}, {}, "").value, "y");
  EXPECT_EQ(r.flags->evaluate("a", {{"memory_mib", 1}}, {}, "").value, "n");
  EXPECT_EQ(r.flags->evaluate("b", {{"memory_mib", 8192}}, {}, "").value, "y");
  EXPECT_EQ(r.flags->evaluate("b", {{"team", "infra"}}, {}, "").value, "n");
}

TEST(Budgets, ReduceMergeDoublingStopsAtTheValueBudget) {
  // The accumulator doubles per element: 2^64 elements at the end.
  expect_over_budget(
      load_flag_text(reduce_bomb(R"({"merge": [{"var": "accumulator"}, {"var": "accumulator"}]})",
                                 "[1]"),
                     "merge.json", {.strict = true}),
      "bomb");
  // The same, nested rather than flattened: [acc, acc] doubles the values without growing the top.
  expect_over_budget(
      load_flag_text(reduce_bomb(R"([{"var": "accumulator"}, {"var": "accumulator"}])", "[1]"),
                     "nest.json", {.strict = true}),
      "bomb");
  // A string that doubles.
  expect_over_budget(
      load_flag_text(reduce_bomb(R"({"cat": [{"var": "accumulator"}, {"var": "accumulator"}]})",
                                 R"("xxxxxxxx")"),
                     "cat.json", {.strict = true}),
      "bomb");
}

TEST(Budgets, ABigResultWithinTheBudgetsGetsAShortErrorMessage) {
  struct Case {
    const char* step;
    const char* initial;
    int doublings;
  };
  // 2^17 bytes of "é" (2 bytes each); an array of 2^12 of them: both within the budgets.
  for (const Case& c :
       {Case{R"({"cat": [{"var": "accumulator"}, {"var": "accumulator"}]})", R"("\u00e9")", 16},
        Case{R"({"merge": [{"var": "accumulator"}, {"var": "accumulator"}]})", R"(["\u00e9"])",
             12}}) {
    std::string list = "[";
    for (int i = 0; i < c.doublings; ++i) list += (i == 0 ? "" : ",") + std::to_string(i);
    list += "]";
    const LoadResult r = load_flag_text(
        R"({"flags": {"f": {"state": "ENABLED", "variants": {"a": "a"}, "defaultVariant": "a",
            "targeting": {"reduce": [)" +
            list + ", " + c.step + ", " + c.initial + "]}}}}",
        "big.json", {.strict = true});
    ASSERT_TRUE(r.ok()) << r.error_text();
    const Resolution res = r.flags->evaluate("f", {}, {}, "d");
    EXPECT_EQ(res.error_code, ErrorCode::kGeneral);
    EXPECT_EQ(res.error_message.find("budget"), std::string::npos) << res.error_message;
    EXPECT_LT(res.error_message.size(), 400U);
    EXPECT_NO_THROW((void)Json(res.error_message).dump());  // still valid UTF-8
  }
}

TEST(Budgets, ABigLiteralListIsNotRefused) {
  std::string list = "[";
  for (int i = 0; i < 50000; ++i) list += (i == 0 ? "\"" : ",\"") + std::to_string(i) + "@x\"";
  list += "]";
  const LoadResult r = load_flag_text(
      R"({"flags": {"f": {"state": "ENABLED", "variants": {"y": "y", "n": "n"},
          "defaultVariant": "n", "targeting": {"if": [{"in": [{"var": "email"}, )" +
          list + R"(]}, "y", "n"]}}}})",
      "big.json", {.strict = true});
  ASSERT_TRUE(r.ok()) << r.error_text();
  // Far more evaluations than one step budget's worth of list elements.
  for (int i = 0; i < 100; ++i) {
    const Resolution res = r.flags->evaluate("f", {{"email", "49999@x"}}, {}, "");
    ASSERT_TRUE(res.ok()) << res.error_message;
    EXPECT_EQ(res.value, "y");
  }
}

TEST(Budgets, CompileNodeBudgetIsAFlagError) {
  Json rule = Json::array();
  for (int i = 0; i < 100; ++i) rule.push_back({{"var", "x"}});
  // 201 nodes: the array, and each var with its argument.
  LogicCompileSession session(nullptr, /*max_nodes=*/250);
  LogicError err;
  EXPECT_TRUE(Logic::compile(rule, session, &err).has_value()) << err.message;
  EXPECT_FALSE(Logic::compile(rule, session, &err).has_value());
  EXPECT_NE(err.message.find("more than 250 compiled nodes"), std::string::npos) << err.message;
}

TEST(Budgets, FlagsCheckDryRunReportsAnEvaluationBombWithItsLocation) {
  const LoadResult r = load_flag_text(
      reduce_bomb(R"({"merge": [{"var": "accumulator"}, {"var": "accumulator"}]})", "[1]"),
      "dry.json", {.strict = true});
  ASSERT_TRUE(r.ok()) << r.error_text();
  const std::vector<Diagnostic> found = check_evaluation_budgets(*r.flags);
  ASSERT_EQ(found.size(), 1U);
  EXPECT_EQ(found[0].severity, Diagnostic::Severity::kFlagError);
  EXPECT_EQ(found[0].file, "dry.json");
  EXPECT_EQ(found[0].line, 2);
  EXPECT_NE(found[0].message.find("flag \"bomb\""), std::string::npos) << found[0].message;
  EXPECT_NE(found[0].message.find("budget"), std::string::npos) << found[0].message;
}

TEST(Budgets, ReloadOfABombKeepsTheLastGoodFlags) {
  char templ[] = "/tmp/memsnap-flags-budget-XXXXXX";
  ASSERT_NE(mkdtemp(templ), nullptr);
  const std::filesystem::path dir = templ;
  const std::filesystem::path file = dir / "flags.yaml";
  std::ofstream(file) << "flags: {f: {state: ENABLED, variants: {on: true}, defaultVariant: on}}\n";
  std::string err;
  auto store = FlagStore::open(file.string(), {}, &err);
  ASSERT_NE(store, nullptr) << err;
  const auto before = store->snapshot();
  std::ofstream(file, std::ios::trunc) << yaml_alias_bomb();
  EXPECT_FALSE(store->reload());
  EXPECT_EQ(store->snapshot(), before);
  EXPECT_EQ(store->snapshot()->evaluate("f", {}, FlagType::kBoolean, false).value, true);
  EXPECT_NE(store->stats().last_error.find("values"), std::string::npos)
      << store->stats().last_error;
  EXPECT_EQ(store->stats().reloads_failed, 1U);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace memsnap::flags
