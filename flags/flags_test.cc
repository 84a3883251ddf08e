// Unit tests of the flag evaluator: the hash, sem_ver, every JsonLogic and flagd operator, every
// reason and error code, the loaders (JSON, YAML, directories) and the bad inputs they refuse.
#include <gtest/gtest.h>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "flags/document.h"
#include "flags/flag_set.h"
#include "flags/jsonlogic.h"
#include "flags/murmur3.h"
#include "flags/semver.h"

namespace memsnap::flags {
namespace {

// ---- murmur3 and bucketing ----

TEST(Murmur3, PublishedVectors) {
  EXPECT_EQ(murmur3_x86_32("", 0), 0U);
  EXPECT_EQ(murmur3_x86_32("", 1), 0x514E28B7U);
  EXPECT_EQ(murmur3_x86_32("", 0xffffffffU), 0x81F16F39U);
  EXPECT_EQ(murmur3_x86_32("test", 0), 0xba6bd213U);
  EXPECT_EQ(murmur3_x86_32("Hello, world!", 0), 0xc0363e43U);
  EXPECT_EQ(murmur3_x86_32("The quick brown fox jumps over the lazy dog", 0), 0x2e4ff723U);
  EXPECT_EQ(murmur3_x86_32("a", 0), 0x3c2569b2U);    // 1-byte tail
  EXPECT_EQ(murmur3_x86_32("ab", 0), 0x9bbfd75fU);   // 2-byte tail
  EXPECT_EQ(murmur3_x86_32("abc", 0), 0xb3dd93faU);  // 3-byte tail
}

TEST(Murmur3, BucketIsHighBitsOfProduct) {
  EXPECT_EQ(bucket_of(0, 100), 0U);
  EXPECT_EQ(bucket_of(0xffffffffU, 100), 99U);
  EXPECT_EQ(bucket_of(0x80000000U, 100), 50U);
  EXPECT_EQ(bucket_of(0x7fffffffU, 2), 0U);
  EXPECT_EQ(bucket_of(0x80000000U, 2), 1U);
  EXPECT_LT(bucket_of(0xffffffffU, 1ULL << 40), 1ULL << 40);  // no overflow past 32-bit weights
}

// ---- sem_ver ----

TEST(SemVer, ParsesLikeGoSemver) {
  EXPECT_TRUE(parse_semver("1.2.3"));
  EXPECT_TRUE(parse_semver("v1.2.3-rc.1+build.5"));
  EXPECT_TRUE(parse_semver("V1"));
  EXPECT_TRUE(parse_semver("1.2"));
  EXPECT_FALSE(parse_semver("2.0.0.0"));
  EXPECT_FALSE(parse_semver("01.2.3"));
  EXPECT_FALSE(parse_semver("1.2-rc1"));  // partial versions take no pre-release
  EXPECT_FALSE(parse_semver("1.2.3-01"));
  EXPECT_FALSE(parse_semver("1.2.3-"));
  EXPECT_FALSE(parse_semver("not-a-version"));
  EXPECT_FALSE(parse_semver(""));
}

TEST(SemVer, ComparesWithPrecedence) {
  auto lt = [](const char* a, const char* b) { return *semver_matches(a, "<", b); };
  EXPECT_TRUE(lt("1.0.0-alpha", "1.0.0-alpha.1"));
  EXPECT_TRUE(lt("1.0.0-alpha.1", "1.0.0-alpha.beta"));
  EXPECT_TRUE(lt("1.0.0-beta.2", "1.0.0-beta.11"));
  EXPECT_TRUE(lt("1.0.0-rc.1", "1.0.0"));
  EXPECT_TRUE(lt("1.9.0", "1.10.0"));
  EXPECT_TRUE(*semver_matches("1.0.0+a", "=", "1.0.0+b"));
  EXPECT_TRUE(*semver_matches("3.1.9", "^", "3.0.0"));
  EXPECT_FALSE(*semver_matches("3.1.9", "~", "3.0.0"));
  EXPECT_TRUE(*semver_matches("3.0.9", "~", "3.0.0"));
  EXPECT_TRUE(*semver_matches("2.0.0", ">=", "2.0"));
  EXPECT_TRUE(*semver_matches("2.0.1", "!=", "2.0.0"));
  EXPECT_TRUE(*semver_matches("2.0.0", "<=", "2.0.0"));
  EXPECT_FALSE(semver_matches("1.0.0", "===", "1.0.0"));
  EXPECT_FALSE(semver_matches("x", "=", "1.0.0"));
}

// ---- JsonLogic operators ----

Json run(const std::string& rule, const std::string& data = "{}", std::string_view flag_key = "f") {
  LogicError err;
  const Json parsed = Json::parse(rule);
  auto logic = Logic::compile(parsed, nullptr, &err);
  EXPECT_TRUE(logic) << rule << ": " << err.message;
  if (!logic) return "compile error";
  const Json ctx = Json::parse(data);
  LogicEnv env;
  env.context = &ctx;
  env.flag_key = flag_key;
  env.timestamp = 1700000000;
  return std::move(logic->evaluate(env)).take();
}

struct OpCase {
  const char* rule;
  const char* data;
  const char* expected;
};

class Operators : public ::testing::TestWithParam<OpCase> {};

TEST_P(Operators, Evaluate) {
  const OpCase& c = GetParam();
  EXPECT_EQ(run(c.rule, c.data), Json::parse(c.expected)) << c.rule << " on " << c.data;
}

INSTANTIATE_TEST_SUITE_P(
    JsonLogic, Operators,
    ::testing::Values(
        // var: dotted paths, array indexes, defaults, whole data, numbers as paths
        OpCase{R"({"var": "a.b"})", R"({"a": {"b": 7}})", "7"},
        OpCase{R"({"var": ["a.x", "dflt"]})", R"({"a": {}})", R"("dflt")"},
        OpCase{R"({"var": "list.1"})", R"({"list": [10, 20]})", "20"},
        OpCase{R"({"var": 1})", R"([10, 20])", "20"},
        OpCase{R"({"var": ""})", R"({"k": 1})", R"({"k": 1})"},
        OpCase{R"({"var": "missing"})", R"({})", "null"},
        OpCase{R"({"var": {"cat": ["a", ".b"]}})", R"({"a": {"b": 3}})", "3"},
        OpCase{R"({"var": "$flagd.flagKey"})", R"({})", R"("f")"},
        OpCase{R"({"var": "$flagd.timestamp"})", R"({})", "1700000000"},
        // missing, missing_some
        OpCase{R"({"missing": ["a", "b", "c"]})", R"({"a": 1, "c": ""})", R"(["b", "c"])"},
        OpCase{R"({"missing": {"merge": ["a", "b"]}})", R"({"b": 1})", R"(["a"])"},
        OpCase{R"({"missing_some": [1, ["a", "b"]]})", R"({"b": 1})", "[]"},
        OpCase{R"({"missing_some": [2, ["a", "b", "c"]]})", R"({"b": 1})", R"(["a", "c"])"},
        // if / ?:
        OpCase{R"({"if": [true, "y", "n"]})", "{}", R"("y")"},
        OpCase{R"({"if": [false, "y", "n"]})", "{}", R"("n")"},
        OpCase{R"({"if": [false, "a", 0, "b", "c"]})", "{}", R"("c")"},
        OpCase{R"({"if": [false, "a"]})", "{}", "null"}, OpCase{R"({"if": []})", "{}", "null"},
        OpCase{R"({"?:": [1, "y", "n"]})", "{}", R"("y")"},
        // equality
        OpCase{R"({"==": [1, "1"]})", "{}", "true"}, OpCase{R"({"==": [0, false]})", "{}", "true"},
        OpCase{R"({"==": [null, 0]})", "{}", "false"}, OpCase{R"({"==": [1.0, 1]})", "{}", "true"},
        OpCase{R"({"===": [1, "1"]})", "{}", "false"}, OpCase{R"({"===": [1, 1.0]})", "{}", "true"},
        OpCase{R"({"!=": [1, "2"]})", "{}", "true"}, OpCase{R"({"!=": [1, "1"]})", "{}", "false"},
        OpCase{R"({"!==": [1, "1"]})", "{}", "true"},
        OpCase{R"({"!==": ["a", "a"]})", "{}", "false"},
        // ordering, including the between form
        OpCase{R"({"<": [1, 2]})", "{}", "true"}, OpCase{R"({"<": ["a", "b"]})", "{}", "true"},
        OpCase{R"({"<": ["10", 9]})", "{}", "false"}, OpCase{R"({"<": [1, 2, 3]})", "{}", "true"},
        OpCase{R"({"<": [1, 1, 3]})", "{}", "false"}, OpCase{R"({"<=": [1, 1, 3]})", "{}", "true"},
        OpCase{R"({"<=": [2, 1]})", "{}", "false"}, OpCase{R"({">": [2, 1]})", "{}", "true"},
        OpCase{R"({">": ["x", 1]})", "{}", "false"}, OpCase{R"({">=": [2, 2]})", "{}", "true"},
        OpCase{R"({">=": [1, 2]})", "{}", "false"},
        // logic and truthiness
        OpCase{R"({"!": [[]]})", "{}", "true"}, OpCase{R"({"!": {}})", "{}", "false"},
        OpCase{R"({"!!": ["0"]})", "{}", "true"}, OpCase{R"({"!!": [""]})", "{}", "false"},
        OpCase{R"({"!!": [0]})", "{}", "false"}, OpCase{R"({"and": [1, "a", 0, "b"]})", "{}", "0"},
        OpCase{R"({"and": [1, "last"]})", "{}", R"("last")"},
        OpCase{R"({"or": [0, "", "x"]})", "{}", R"("x")"},
        OpCase{R"({"or": [0, false]})", "{}", "false"},
        // in, strings
        OpCase{R"({"in": ["Spring", "Springfield"]})", "{}", "true"},
        OpCase{R"({"in": ["x", "Springfield"]})", "{}", "false"},
        OpCase{R"({"in": ["b", ["a", "b"]]})", "{}", "true"},
        OpCase{R"({"in": [1, ["1"]]})", "{}", "false"},
        OpCase{R"({"in": ["a", 5]})", "{}", "false"},
        OpCase{R"({"cat": ["I love", " pie", 1, true, null]})", "{}", R"("I love pie1truenull")"},
        OpCase{R"({"cat": [1.5, "/", 2.0]})", "{}", R"("1.5/2")"},
        OpCase{R"({"substr": ["jsonlogic", 4]})", "{}", R"("logic")"},
        OpCase{R"({"substr": ["jsonlogic", -5]})", "{}", R"("logic")"},
        OpCase{R"({"substr": ["jsonlogic", 1, 3]})", "{}", R"("son")"},
        OpCase{R"({"substr": ["jsonlogic", 4, -2]})", "{}", R"("log")"},
        OpCase{R"({"substr": ["h\u00e9llo", 1, 2]})", "{}", R"("\u00e9l")"},
        // arithmetic
        OpCase{R"({"+": [1, "2", 3.5]})", "{}", "6.5"}, OpCase{R"({"+": []})", "{}", "0"},
        OpCase{R"({"-": [5, 7]})", "{}", "-2"}, OpCase{R"({"-": [3]})", "{}", "-3"},
        OpCase{R"({"*": [2, "3"]})", "{}", "6"}, OpCase{R"({"/": [7, 2]})", "{}", "3.5"},
        OpCase{R"({"/": [1, 0]})", "{}", "null"}, OpCase{R"({"%": [7, 3]})", "{}", "1"},
        OpCase{R"({"min": [3, 1, 2]})", "{}", "1"}, OpCase{R"({"max": [3, "7", 2]})", "{}", "7"},
        OpCase{R"({"max": []})", "{}", "null"},
        // arrays
        OpCase{R"({"merge": [[1, 2], 3, [[4]]]})", "{}", "[1, 2, 3, [4]]"},
        OpCase{R"({"map": [[1, 2, 3], {"*": [{"var": ""}, 2]}]})", "{}", "[2, 4, 6]"},
        OpCase{R"({"map": [{"var": "x"}, 1]})", "{}", "[]"},
        OpCase{R"({"filter": [[1, 2, 3, 4], {"%": [{"var": ""}, 2]}]})", "{}", "[1, 3]"},
        OpCase{
            R"({"reduce": [[1, 2, 3], {"+": [{"var": "current"}, {"var": "accumulator"}]}, 10]})",
            "{}", "16"},
        OpCase{R"({"reduce": ["x", 1, 5]})", "{}", "5"},
        OpCase{R"({"all": [[1, 2], {">": [{"var": ""}, 0]}]})", "{}", "true"},
        OpCase{R"({"all": [[], true]})", "{}", "false"},
        OpCase{R"({"some": [{"var": "xs"}, {"==": [{"var": "id"}, 2]}]})",
               R"({"xs": [{"id": 1}, {"id": 2}]})", "true"},
        OpCase{R"({"none": [[1, 2], {">": [{"var": ""}, 5]}]})", "{}", "true"},
        OpCase{R"({"none": [[1, 9], {">": [{"var": ""}, 5]}]})", "{}", "false"},
        // data, not logic
        OpCase{R"({"a": 1, "b": 2})", "{}", R"({"a": 1, "b": 2})"},
        OpCase{R"([1, {"var": "x"}])", R"({"x": 2})", "[1, 2]"},
        // flagd: starts_with, ends_with, sem_ver
        OpCase{R"({"starts_with": [{"var": "id"}, "abc"]})", R"({"id": "abcdef"})", "true"},
        OpCase{R"({"starts_with": [{"var": "id"}, "abc"]})", R"({"id": "xabc"})", "false"},
        OpCase{R"({"ends_with": [{"var": "id"}, "def"]})", R"({"id": "abcdef"})", "true"},
        OpCase{R"({"ends_with": ["a", "long"]})", "{}", "false"},
        OpCase{R"({"ends_with": [1, "1"]})", "{}", "null"},
        OpCase{R"({"starts_with": ["abc"]})", "{}", "null"},
        OpCase{R"({"sem_ver": [{"var": "v"}, ">=", "1.4.0"]})", R"({"v": "v1.10.2"})", "true"},
        OpCase{R"({"sem_ver": [{"var": "v"}, "<", "1.4.0"]})", R"({"v": 1.2})", "true"},
        OpCase{R"({"sem_ver": ["1.0.0", "~"]})", "{}", "null"},
        OpCase{R"({"sem_ver": ["junk", "=", "1.0.0"]})", "{}", "null"}));

TEST(Fractional, BucketsByFlagKeyAndTargetingKeyByDefault) {
  const std::string rule = R"({"fractional": [["a", 50], ["b", 50]]})";
  // The default bucketing value is flag key + targeting key, no separator.
  const std::uint32_t h = murmur3_x86_32("myflaguser-1");
  const Json expected = bucket_of(h, 100) < 50 ? "a" : "b";
  EXPECT_EQ(run(rule, R"({"targetingKey": "user-1"})", "myflag"), expected);
  EXPECT_EQ(run(rule, R"({})", "myflag"), nullptr);
  EXPECT_EQ(run(rule, R"({"targetingKey": ""})", "myflag"), nullptr);
  EXPECT_EQ(run(rule, R"({"targetingKey": 5})", "myflag"), nullptr);
}

TEST(Fractional, ExplicitBucketingValueAndWeights) {
  // Weight 0 never wins; a sole positive weight always does; negative counts as 0.
  for (const char* user : {"a", "b", "c", "d", "e", "f"}) {
    const std::string ctx = std::string(R"({"u": ")") + user + "\"}";
    EXPECT_EQ(run(R"({"fractional": [{"var": "u"}, ["x", 0], ["y", 10]]})", ctx), "y");
    EXPECT_EQ(run(R"({"fractional": [{"var": "u"}, ["x", -5], ["y", 1]]})", ctx), "y");
    EXPECT_EQ(run(R"({"fractional": [{"var": "u"}, ["x", 0], ["y", 0]]})", ctx), nullptr);
  }
  EXPECT_EQ(run(R"({"fractional": [{"var": "nope"}, ["x", 1]]})"), nullptr);
}

TEST(Fractional, SplitsEvenlyOverManyKeys) {
  int counts[3] = {0, 0, 0};
  const std::string rule = R"({"fractional": [["p", 1], ["m", 1], ["h", 1]]})";
  for (int i = 0; i < 3000; ++i) {
    const Json r = run(rule, R"({"targetingKey": "sandbox-)" + std::to_string(i) + "\"}", "exp");
    counts[r == "p" ? 0 : r == "m" ? 1 : 2]++;
  }
  for (int c : counts) EXPECT_NEAR(c, 1000, 120);
}

TEST(Logic, CompileErrors) {
  LogicError err;
  EXPECT_FALSE(Logic::compile(Json::parse(R"({"bogus_op": [1]})"), nullptr, &err));
  EXPECT_NE(err.message.find("unknown operator \"bogus_op\""), std::string::npos);
  EXPECT_FALSE(Logic::compile(Json::parse(R"({"if": [{"$ref": "nope"}, 1]})"), nullptr, &err));
  EXPECT_NE(err.message.find("missing evaluator \"nope\""), std::string::npos);
  EXPECT_EQ(err.pointer, "/if/0");
  const Json cyc = Json::parse(R"({"a": {"$ref": "b"}, "b": {"!": {"$ref": "a"}}})");
  EXPECT_FALSE(Logic::compile(Json::parse(R"({"$ref": "a"})"), &cyc, &err));
  EXPECT_NE(err.message.find("cycle"), std::string::npos);
  EXPECT_FALSE(Logic::compile(Json::parse(R"({"fractional": ["key"]})"), nullptr, &err));
  EXPECT_FALSE(Logic::compile(Json::parse(R"({"fractional": [["a", "ten"]]})"), nullptr, &err));
  EXPECT_FALSE(Logic::compile(Json::parse(R"({"fractional": [["a", 1, 2]]})"), nullptr, &err));
}

TEST(Logic, DeepExpressionIsRefusedAtCompileTime) {
  // 10,000 nested "!" built without recursion; compiling refuses it cleanly.
  Json rule = true;
  for (int i = 0; i < 10000; ++i) rule = Json{{"!", std::move(rule)}};
  LogicError err;
  EXPECT_FALSE(Logic::compile(rule, nullptr, &err));
  EXPECT_NE(err.message.find("nested deeper than"), std::string::npos);
  // Just under the limit still works.
  Json ok = true;
  for (int i = 0; i < kMaxExpressionDepth - 1; ++i) ok = Json{{"!", std::move(ok)}};
  ASSERT_TRUE(Logic::compile(ok, nullptr, &err)) << err.message;
}

// ---- flag sets: reasons, error codes, metadata ----

const char* kFlags = R"({
  "metadata": {"flagSetId": "memsnap", "version": 3},
  "$evaluators": {"is_team_a": {"==": [{"var": "team"}, "a"]}},
  "flags": {
    "static": {"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "on",
               "metadata": {"version": 4, "owner": "me"}},
    "targeted": {"state": "ENABLED", "variants": {"x": "X", "y": "Y"}, "defaultVariant": "y",
                 "targeting": {"if": [{"$ref": "is_team_a"}, "x", null]}},
    "off": {"state": "DISABLED", "variants": {"on": 1}, "defaultVariant": "on"},
    "no-default": {"state": "ENABLED", "variants": {"a": 1, "b": 2}},
    "bad-variant": {"state": "ENABLED", "variants": {"a": 1}, "defaultVariant": "a",
                    "targeting": {"cat": ["z"]}},
    "bool-result": {"state": "ENABLED", "variants": {"true": "T", "false": "F"},
                    "defaultVariant": "false", "targeting": {"==": [{"var": "n"}, 1]}},
    "broken": {"state": "ENABLED", "variants": {"a": 1}, "defaultVariant": "a",
               "targeting": {"nope": []}},
    "numbers": {"state": "ENABLED", "variants": {"int": 2, "float": 2.5}, "defaultVariant": "int"},
    "empty-targeting": {"state": "ENABLED", "variants": {"a": "A"}, "defaultVariant": "a",
                        "targeting": {}}
  }
})";

class FlagSetTest : public ::testing::Test {
 protected:
  void SetUp() override {
    LoadResult r = load_flag_text(kFlags, "flags.json");
    ASSERT_TRUE(r.ok()) << r.error_text();
    set_ = r.flags;
  }
  Resolution eval(const std::string& key, const Json& ctx = Json::object(),
                  std::optional<FlagType> type = std::nullopt, const Json& dflt = "dflt") {
    return set_->evaluate(key, ctx, type, dflt);
  }
  std::shared_ptr<const FlagSet> set_;
};

TEST_F(FlagSetTest, Static) {
  const Resolution r = eval("static", {}, FlagType::kBoolean, false);
  EXPECT_EQ(r.value, true);
  EXPECT_EQ(r.variant, "on");
  EXPECT_EQ(r.reason, Reason::kStatic);
  EXPECT_EQ(r.error_code, ErrorCode::kNone);
  // Flag metadata overlays the set's.
  EXPECT_EQ(r.metadata(), Json::parse(R"({"flagSetId": "memsnap", "version": 4, "owner": "me"})"));
  EXPECT_EQ(eval("empty-targeting").reason, Reason::kStatic);
}

TEST_F(FlagSetTest, TargetingMatchAndDefault) {
  Resolution r = eval("targeted", {{"team", "a"}});
  EXPECT_EQ(r.value, "X");
  EXPECT_EQ(r.reason, Reason::kTargetingMatch);
  r = eval("targeted", {{"team", "b"}});
  EXPECT_EQ(r.value, "Y");
  EXPECT_EQ(r.variant, "y");
  EXPECT_EQ(r.reason, Reason::kDefault);
  // Booleans from targeting name the variants "true" / "false".
  EXPECT_EQ(eval("bool-result", {{"n", 1}}).value, "T");
  EXPECT_EQ(eval("bool-result", {{"n", 2}}).value, "F");
}

TEST_F(FlagSetTest, NoDefaultVariantGivesCallerDefault) {
  const Resolution r = eval("no-default", {}, FlagType::kInteger, 42);
  EXPECT_EQ(r.value, 42);
  EXPECT_FALSE(r.variant);
  EXPECT_EQ(r.reason, Reason::kDefault);
  EXPECT_TRUE(r.ok());
}

TEST_F(FlagSetTest, Disabled) {
  const Resolution r = eval("off", {}, FlagType::kInteger, 7);
  EXPECT_EQ(r.value, 7);
  EXPECT_EQ(r.reason, Reason::kDisabled);
  EXPECT_EQ(r.error_code, ErrorCode::kNone);
  EXPECT_FALSE(r.variant);
}

TEST_F(FlagSetTest, ErrorCodes) {
  Resolution r = eval("absent");
  EXPECT_EQ(r.reason, Reason::kError);
  EXPECT_EQ(r.error_code, ErrorCode::kFlagNotFound);
  EXPECT_EQ(r.value, "dflt");
  r = eval("static", {}, FlagType::kString, "s");
  EXPECT_EQ(r.error_code, ErrorCode::kTypeMismatch);
  EXPECT_EQ(r.value, "s");
  EXPECT_FALSE(r.variant);
  r = eval("bad-variant");
  EXPECT_EQ(r.error_code, ErrorCode::kGeneral);
  EXPECT_NE(r.error_message.find("\"z\""), std::string::npos);
  r = eval("broken");
  EXPECT_EQ(r.error_code, ErrorCode::kParseError);
  EXPECT_NE(r.error_message.find("flags.json:"), std::string::npos);
  EXPECT_NE(r.error_message.find("unknown operator \"nope\""), std::string::npos);
  EXPECT_FALSE(r.error_message.empty());
  EXPECT_EQ(error_code_name(r.error_code), "PARSE_ERROR");
}

TEST_F(FlagSetTest, NumberTypes) {
  EXPECT_EQ(eval("numbers", {}, FlagType::kFloat, 0.0).value, 2.0);
  EXPECT_TRUE(eval("numbers", {}, FlagType::kFloat, 0.0).value.is_number_float());
  EXPECT_EQ(eval("numbers", {}, FlagType::kInteger, 0).value, 2);
  EXPECT_EQ(set_->find("numbers")->type, FlagType::kFloat);
}

TEST_F(FlagSetTest, ExplainTracesTheRuleAndTheBucket) {
  LoadResult loaded = load_flag_text(R"({"flags": {"exp": {"state": "ENABLED",
      "variants": {"a": "a", "b": "b"}, "defaultVariant": "a",
      "targeting": {"if": [{"==": [{"var": "team"}, "x"]}, "a",
                           {"fractional": [["a", 1], ["b", 1]]}]}}}})",
                                     "exp.json");
  ASSERT_TRUE(loaded.ok()) << loaded.error_text();
  EvalOptions opts;
  opts.explain = true;
  const Resolution r =
      loaded.flags->evaluate("exp", {{"targetingKey", "sb-1"}, {"team", "y"}}, {}, nullptr, opts);
  ASSERT_TRUE(r.trace.is_array()) << r.trace;
  bool saw_if = false, saw_fractional = false;
  for (const auto& step : r.trace) {
    if (step["op"] == "if") {
      saw_if = true;
      EXPECT_EQ(step["matched"], "else");
    }
    if (step["op"] == "fractional") {
      saw_fractional = true;
      EXPECT_EQ(step["bucketingValue"], "expsb-1");
      EXPECT_EQ(step["hash"], murmur3_x86_32("expsb-1"));
      EXPECT_EQ(step["bucket"], bucket_of(murmur3_x86_32("expsb-1"), 2));
      EXPECT_EQ(step["result"], r.value);
    }
  }
  EXPECT_TRUE(saw_if && saw_fractional) << r.trace.dump(2);
  EXPECT_EQ(r.trace.back()["reason"], "TARGETING_MATCH");
  EXPECT_TRUE(loaded.flags->evaluate("exp", {}, {}, nullptr).trace.is_null());
}

// ---- loaders and bad input ----

LoadResult load(const std::string& text, const std::string& file = "f.json", bool strict = false) {
  return load_flag_text(text, file, LoadOptions{.strict = strict});
}

bool has(const LoadResult& r, const std::string& needle) {
  for (const auto& d : r.diagnostics) {
    if (d.to_string().find(needle) != std::string::npos) return true;
  }
  return false;
}

TEST(Loader, InvalidJsonSaysWhere) {
  const LoadResult r = load("{\n  \"flags\": {\n    \"a\": [1,,]\n  }\n}");
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(has(r, "f.json:3:")) << r.error_text();
  EXPECT_TRUE(has(r, "invalid JSON")) << r.error_text();
}

TEST(Loader, InvalidYamlSaysWhere) {
  const LoadResult r = load("flags:\n  a:\n    state: [ENABLED\n", "f.yaml");
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(has(r, "f.yaml:")) << r.error_text();
  EXPECT_TRUE(has(r, "invalid YAML")) << r.error_text();
}

TEST(Loader, ValidationErrorsCarryLineAndColumn) {
  const LoadResult r = load(
      "{\"flags\": {\n"
      "  \"a\": {\"state\": \"ON\", \"variants\": {\"x\": 1}}\n"
      "}}");
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(has(r, "f.json:2:18: flag \"a\": state must be ENABLED or DISABLED"))
      << r.error_text();

  const LoadResult y = load(
      "flags:\n"
      "  a:\n"
      "    state: ENABLED\n"
      "    variants: {x: 1}\n"
      "    targetting: {}\n",
      "f.yaml");
  ASSERT_FALSE(y.ok());
  EXPECT_TRUE(has(y, "f.yaml:5:5: flag \"a\": unknown field \"targetting\"")) << y.error_text();
}

TEST(Loader, StructuralErrors) {
  EXPECT_TRUE(has(load("[]"), "must be a map"));
  EXPECT_TRUE(has(load("{}"), "no \"flags\" map"));
  EXPECT_TRUE(has(load(R"({"flags": {"a": {"state": "ENABLED"}}})"), "\"variants\" must be"));
  EXPECT_TRUE(has(load(R"({"flags": {"a": {"variants": {"x": 1}}}})"), "missing \"state\""));
  EXPECT_TRUE(has(load(R"({"flags": {}, "metadata": {"x": [1]}})"), "metadata \"x\""));
  EXPECT_TRUE(has(load(R"({"flags": {"a": 1, "a": 2}})"), "duplicate key \"a\""));
  EXPECT_TRUE(has(load("flags:\n  a: 1\n  a: 2\n", "f.yaml"), "f.yaml:3:3: duplicate key"));
}

TEST(Loader, FlagErrorsAreFlagLocalUnlessStrict) {
  const std::string text = R"({"flags": {
    "good": {"state": "ENABLED", "variants": {"a": 1}, "defaultVariant": "a"},
    "mixed": {"state": "ENABLED", "variants": {"a": 1, "b": "one"}, "defaultVariant": "a"},
    "unknown-op": {"state": "ENABLED", "variants": {"a": 1}, "targeting": {"frobnicate": [1]}},
    "missing-ref": {"state": "ENABLED", "variants": {"a": 1}, "targeting": {"$ref": "nope"}},
    "bad-default": {"state": "ENABLED", "variants": {"a": 1}, "defaultVariant": "b"}
  }})";
  const LoadResult lenient = load(text);
  ASSERT_TRUE(lenient.ok());
  EXPECT_TRUE(has(lenient, "variants of mixed types"));
  EXPECT_TRUE(has(lenient, "unknown operator \"frobnicate\""));
  EXPECT_TRUE(has(lenient, "$ref to missing evaluator \"nope\""));
  EXPECT_TRUE(has(lenient, "defaultVariant \"b\" is not one of its variants"));
  EXPECT_EQ(lenient.flags->evaluate("good", {}, {}, 0).value, 1);
  for (const char* key : {"mixed", "unknown-op", "missing-ref", "bad-default"}) {
    EXPECT_EQ(lenient.flags->evaluate(key, {}, {}, 0).error_code, ErrorCode::kParseError) << key;
  }
  EXPECT_FALSE(load(text, "f.json", true).ok());
}

TEST(Loader, FractionalWeightWarnings) {
  const LoadResult r = load(R"({"flags": {
    "zero": {"state": "ENABLED", "variants": {"a": 1, "b": 2}, "defaultVariant": "a",
             "targeting": {"fractional": [["a", 0], ["b", 0]]}},
    "negative": {"state": "ENABLED", "variants": {"a": 1, "b": 2}, "defaultVariant": "a",
                 "targeting": {"fractional": [["a", -10], ["b", 10]]}}}})",
                            "f.json", true);
  ASSERT_TRUE(r.ok()) << r.error_text();  // legal (flagd semantics), but warned about
  EXPECT_TRUE(has(r, "warning: flag \"zero\": targeting: fractional weights sum to 0"));
  EXPECT_TRUE(has(r, "warning: flag \"negative\": targeting: negative fractional weight"));
  const Resolution z = r.flags->evaluate("zero", {{"targetingKey", "k"}}, {}, 0);
  EXPECT_EQ(z.reason, Reason::kDefault);
  EXPECT_EQ(z.value, 1);
  for (int i = 0; i < 20; ++i) {
    const Json ctx = {{"targetingKey", "k" + std::to_string(i)}};
    EXPECT_EQ(r.flags->evaluate("negative", ctx, {}, 0).variant, "b");
  }
}

TEST(Loader, DeepJsonIsRefusedWithoutRecursion) {
  std::string deep = R"({"flags": {"a": {"state": "ENABLED", "variants": {"a": 1}, "targeting": )";
  for (int i = 0; i < 10000; ++i) deep += R"({"!": )";
  deep += "true";
  for (int i = 0; i < 10000; ++i) deep += "}";
  deep += "}}}";
  const LoadResult r = load(deep);
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(has(r, "nesting deeper than")) << r.error_text();
  EXPECT_TRUE(has(r, "f.json:1:")) << r.error_text();

  // Within the document limit but over the expression limit: the flag is refused.
  std::string mid = R"({"flags": {"a": {"state": "ENABLED", "variants": {"a": 1}, "targeting": )";
  for (int i = 0; i < 200; ++i) mid += R"({"!": )";
  mid += "true";
  for (int i = 0; i < 200; ++i) mid += "}";
  mid += "}}}";
  const LoadResult m = load(mid);
  ASSERT_TRUE(m.ok());
  EXPECT_TRUE(has(m, "expression nested deeper than")) << m.error_text();
  EXPECT_EQ(m.flags->evaluate("a", {}, {}, 0).error_code, ErrorCode::kParseError);
}

TEST(Loader, DeepYamlIsRefused) {
  std::string deep = "flags: ";
  for (int i = 0; i < 10000; ++i) deep += "[";
  for (int i = 0; i < 10000; ++i) deep += "]";
  const LoadResult r = load(deep, "f.yaml");
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(has(r, "f.yaml:1:")) << r.error_text();
}

TEST(Loader, YamlScalarsAndRefs) {
  const LoadResult r = load(R"(
metadata:
  version: "1.0"
$evaluators:
  big: {">=": [{var: memory_mib}, 4096]}
flags:
  f:
    state: ENABLED
    variants:
      yes: "1.2.3"
      no: 1.2.3
      quoted: "true"
    defaultVariant: no
    targeting:
      if: [{$ref: big}, "yes"]
  n:
    state: ENABLED
    variants: {one: 1, half: 0.5}
    defaultVariant: half
  b:
    state: DISABLED
    variants: {on: true, off: false}
    defaultVariant: ~
)",
                            "f.yaml");
  ASSERT_TRUE(r.ok()) << r.error_text();
  EXPECT_EQ(r.error_text(), "");
  const FlagSet& set = *r.flags;
  Resolution res = set.evaluate("f", {{"memory_mib", 8192}}, FlagType::kString, "");
  EXPECT_EQ(res.value, "1.2.3");
  EXPECT_EQ(res.variant, "yes");
  EXPECT_EQ(res.reason, Reason::kTargetingMatch);
  res = set.evaluate("f", {{"memory_mib", 1024}}, FlagType::kString, "");
  EXPECT_EQ(res.variant, "no");
  EXPECT_EQ(res.value, "1.2.3");
  EXPECT_EQ(res.metadata()["version"], "1.0");
  EXPECT_EQ(*set.find("f")->variant("quoted"), "true");
  EXPECT_EQ(set.find("n")->type, FlagType::kFloat);
  EXPECT_EQ(set.evaluate("n", {}, {}, 0).value, 0.5);
  EXPECT_EQ(set.evaluate("b", {}, FlagType::kBoolean, true).reason, Reason::kDisabled);
}

TEST(Loader, DirectoryMergesFilesAndRefusesDuplicateKeys) {
  char templ[] = "/tmp/memsnap-flags-dir-XXXXXX";
  ASSERT_NE(mkdtemp(templ), nullptr);
  const std::filesystem::path dir = templ;
  std::ofstream(dir / "a.json") << R"({"flags": {"x": {"state": "ENABLED", "variants": {"v": 1},
                                      "defaultVariant": "v"}}})";
  std::ofstream(dir / "b.yaml") << "flags:\n  y:\n    state: ENABLED\n    variants: {v: 2}\n"
                                   "    defaultVariant: v\n";
  std::ofstream(dir / "notes.txt") << "ignored";
  std::ofstream(dir / ".hidden.json") << "ignored";
  LoadResult r = load_flag_source(dir.string());
  ASSERT_TRUE(r.ok()) << r.error_text();
  EXPECT_EQ(r.flags->keys(), (std::vector<std::string>{"x", "y"}));
  EXPECT_EQ(r.flags->files().size(), 2U);
  std::ofstream(dir / "c.yaml") << "flags:\n  x:\n    state: ENABLED\n    variants: {v: 3}\n";
  r = load_flag_source(dir.string());
  EXPECT_FALSE(r.ok());
  EXPECT_TRUE(has(r, "c.yaml:2:3: flag \"x\" is also defined at")) << r.error_text();
  std::filesystem::remove_all(dir);
  EXPECT_FALSE(load_flag_source(dir.string()).ok());
}

TEST(Loader, TestkitFileLoadsWithItsOneBrokenFlag) {
  const LoadResult r =
      load_flag_source(std::string(MEMSNAP_FLAGD_TESTBED_DIR) + "/flags/testkit-flags.json");
  ASSERT_TRUE(r.ok()) << r.error_text();
  EXPECT_EQ(r.error_text().find("ref-to-nonexistent-evaluator-flag") != std::string::npos, true);
}

}  // namespace
}  // namespace memsnap::flags
