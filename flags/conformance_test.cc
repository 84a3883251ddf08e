// The flagd-testbed evaluator conformance suite, run as it is: this harness parses the Gherkin
// .feature files (Scenario Outlines, Examples tables, tags, cell escapes) and runs every scenario
// against a FlagSet loaded from testkit-flags.json. The data stays in ../shared; its directory
// comes from $MEMSNAP_FLAGD_TESTBED or the path CMake compiled in.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "flags/flag_set.h"

namespace memsnap::flags {
namespace {

using Table = std::vector<std::vector<std::string>>;

struct Step {
  std::string text;
  Table table;
};

struct Examples {
  std::vector<std::string> tags;
  std::string name;
  Table rows;  // rows[0] is the header
};

struct ScenarioDef {
  std::string name;
  std::vector<std::string> tags;
  std::vector<Step> steps;
  std::vector<Examples> examples;
  bool outline = false;
  int line = 0;
};

struct Feature {
  std::string file;
  std::vector<std::string> tags;
  std::vector<Step> background;
  std::vector<ScenarioDef> scenarios;
};

// One runnable scenario after Outline expansion.
struct Scenario {
  std::string id;  // file:line [example row]
  std::set<std::string> tags;
  std::vector<Step> steps;
};

std::string trim(const std::string& s) {
  const auto b = s.find_first_not_of(" \t\r");
  if (b == std::string::npos) return "";
  const auto e = s.find_last_not_of(" \t\r");
  return s.substr(b, e - b + 1);
}

bool starts_with(const std::string& s, const std::string& prefix) {
  return s.rfind(prefix, 0) == 0;
}

// "| a | b\|c |" -> {"a", "b|c"}, with Gherkin's cell escapes \|, \\ and \n.
std::vector<std::string> parse_row(const std::string& line) {
  std::vector<std::string> cells;
  std::string cell;
  bool started = false;
  for (std::size_t i = 0; i < line.size(); ++i) {
    const char c = line[i];
    if (c == '\\' && i + 1 < line.size()) {
      const char n = line[i + 1];
      if (n == '|' || n == '\\') {
        cell += n;
        ++i;
        continue;
      }
      if (n == 'n') {
        cell += '\n';
        ++i;
        continue;
      }
      cell += c;
      continue;
    }
    if (c == '|') {
      if (started) cells.push_back(trim(cell));
      started = true;
      cell.clear();
      continue;
    }
    cell += c;
  }
  return cells;
}

std::vector<std::string> parse_tags(const std::string& line) {
  std::vector<std::string> tags;
  std::istringstream in(line);
  std::string t;
  while (in >> t) {
    if (t[0] == '#') break;
    tags.push_back(t);
  }
  return tags;
}

Feature parse_feature(const std::string& path) {
  Feature f;
  f.file = path;
  std::ifstream in(path);
  std::string raw;
  std::vector<std::string> pending_tags;
  enum class Where { kNone, kBackground, kScenario, kExamples } where = Where::kNone;
  int lineno = 0;
  auto current_steps = [&]() -> std::vector<Step>& {
    return where == Where::kBackground ? f.background : f.scenarios.back().steps;
  };
  while (std::getline(in, raw)) {
    ++lineno;
    const std::string line = trim(raw);
    if (line.empty() || line[0] == '#') continue;
    if (line[0] == '@') {
      const auto tags = parse_tags(line);
      pending_tags.insert(pending_tags.end(), tags.begin(), tags.end());
      continue;
    }
    if (starts_with(line, "Feature:")) {
      f.tags = std::move(pending_tags);
      pending_tags.clear();
      where = Where::kNone;
    } else if (starts_with(line, "Background:")) {
      where = Where::kBackground;
    } else if (starts_with(line, "Scenario Outline:") || starts_with(line, "Scenario Template:") ||
               starts_with(line, "Scenario:") || starts_with(line, "Example:")) {
      ScenarioDef s;
      s.outline = !starts_with(line, "Scenario:") && !starts_with(line, "Example:");
      s.name = trim(line.substr(line.find(':') + 1));
      s.tags = std::move(pending_tags);
      s.line = lineno;
      pending_tags.clear();
      f.scenarios.push_back(std::move(s));
      where = Where::kScenario;
    } else if (starts_with(line, "Examples:") || starts_with(line, "Scenarios:")) {
      Examples e;
      e.name = trim(line.substr(line.find(':') + 1));
      e.tags = std::move(pending_tags);
      pending_tags.clear();
      f.scenarios.back().examples.push_back(std::move(e));
      where = Where::kExamples;
    } else if (line[0] == '|') {
      if (where == Where::kExamples) {
        f.scenarios.back().examples.back().rows.push_back(parse_row(line));
      } else {
        current_steps().back().table.push_back(parse_row(line));
      }
    } else {
      static const std::regex kStep(R"(^(Given|When|Then|And|But|\*) (.*)$)");
      std::smatch m;
      if (!std::regex_match(line, m, kStep)) {
        ADD_FAILURE() << path << ":" << lineno << ": cannot parse line: " << line;
        continue;
      }
      if (where == Where::kExamples) where = Where::kScenario;  // steps after Examples: none
      current_steps().push_back({m[2].str(), {}});
    }
  }
  return f;
}

std::string substitute(std::string text, const std::vector<std::string>& header,
                       const std::vector<std::string>& row) {
  for (std::size_t i = 0; i < header.size() && i < row.size(); ++i) {
    const std::string key = "<" + header[i] + ">";
    for (std::size_t at = text.find(key); at != std::string::npos;
         at = text.find(key, at + row[i].size())) {
      text.replace(at, key.size(), row[i]);
    }
  }
  return text;
}

std::vector<Scenario> expand(const Feature& f) {
  std::vector<Scenario> out;
  for (const auto& s : f.scenarios) {
    std::set<std::string> base(f.tags.begin(), f.tags.end());
    base.insert(s.tags.begin(), s.tags.end());
    const std::string where = f.file + ":" + std::to_string(s.line) + " (" + s.name + ")";
    if (!s.outline) {
      Scenario sc{where, base, f.background};
      sc.steps.insert(sc.steps.end(), s.steps.begin(), s.steps.end());
      out.push_back(std::move(sc));
      continue;
    }
    for (const auto& ex : s.examples) {
      if (ex.rows.empty()) continue;
      for (std::size_t r = 1; r < ex.rows.size(); ++r) {
        Scenario sc{where + " [" + ex.name + " row " + std::to_string(r) + "]", base, {}};
        sc.tags.insert(ex.tags.begin(), ex.tags.end());
        for (const auto* list : {&f.background, &s.steps}) {
          for (const Step& st : *list) {
            Step e{substitute(st.text, ex.rows[0], ex.rows[r]), st.table};
            for (auto& trow : e.table) {
              for (auto& cell : trow) cell = substitute(cell, ex.rows[0], ex.rows[r]);
            }
            sc.steps.push_back(std::move(e));
          }
        }
        out.push_back(std::move(sc));
      }
    }
  }
  return out;
}

// The {string} parameter of a Cucumber expression: \" and \\ unescaped.
std::string unquote(const std::string& s) {
  std::string out;
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 1 < s.size() && (s[i + 1] == '"' || s[i + 1] == '\\')) {
      out += s[++i];
    } else {
      out += s[i];
    }
  }
  return out;
}

FlagType type_of(const std::string& gherkin_type) {
  if (gherkin_type == "Boolean") return FlagType::kBoolean;
  if (gherkin_type == "Integer") return FlagType::kInteger;
  if (gherkin_type == "Float") return FlagType::kFloat;
  if (gherkin_type == "Object") return FlagType::kObject;
  return FlagType::kString;
}

Json typed_value(const std::string& text, const std::string& gherkin_type) {
  if (gherkin_type == "Boolean") return text == "true";
  if (gherkin_type == "Integer") return std::stoll(text);
  if (gherkin_type == "Float") return std::stod(text);
  if (gherkin_type == "Object") return Json::parse(text);
  return text;
}

bool same_value(const Json& actual, const Json& expected) {
  if (actual.is_number() && expected.is_number()) {
    return actual.get<double>() == expected.get<double>();
  }
  return actual == expected;
}

// Runs one scenario; returns the failures (empty when it passed).
std::vector<std::string> run(const Scenario& sc, const FlagSet& set) {
  static const std::string q = R"re("((?:[^"\\]|\\.)*)")re";
  static const std::regex kEvaluator("^an evaluator$");
  static const std::regex kFlag("^a ([A-Za-z]+)-flag with key " + q + " and a fallback value " + q +
                                "$");
  static const std::regex kNested("^a context containing a nested property with outer key " + q +
                                  " and inner key " + q + ", with value " + q + "$");
  static const std::regex kTargetingKey("^a context containing a targeting key with value " + q +
                                        "$");
  static const std::regex kKey("^a context containing a key " + q + ", with type " + q +
                               " and with value " + q + "$");
  static const std::regex kEvaluate("^the flag was evaluated with details$");
  static const std::regex kValue("^the resolved details value should be " + q + "$");
  static const std::regex kReason("^the reason should be " + q + "$");
  static const std::regex kErrorCode("^the error-code should be " + q + "$");
  static const std::regex kMetaContains("^the resolved metadata should contain$");
  static const std::regex kMetaEmpty("^the resolved metadata is empty$");

  std::vector<std::string> failures;
  std::string key;
  std::string type;
  Json fallback;
  Json context = Json::object();
  std::optional<Resolution> res;
  auto need_result = [&]() {
    if (!res) failures.push_back("assertion before evaluation");
    return res.has_value();
  };
  for (const Step& step : sc.steps) {
    std::smatch m;
    if (std::regex_match(step.text, m, kEvaluator)) {
      continue;
    } else if (std::regex_match(step.text, m, kFlag)) {
      type = m[1].str();
      key = unquote(m[2].str());
      fallback = typed_value(unquote(m[3].str()), type);
    } else if (std::regex_match(step.text, m, kNested)) {
      context[unquote(m[1].str())][unquote(m[2].str())] = unquote(m[3].str());
    } else if (std::regex_match(step.text, m, kTargetingKey)) {
      context["targetingKey"] = unquote(m[1].str());
    } else if (std::regex_match(step.text, m, kKey)) {
      context[unquote(m[1].str())] = typed_value(unquote(m[3].str()), unquote(m[2].str()));
    } else if (std::regex_match(step.text, m, kEvaluate)) {
      res = set.evaluate(key, context, type_of(type), fallback);
    } else if (std::regex_match(step.text, m, kValue)) {
      if (!need_result()) continue;
      const Json expected = typed_value(unquote(m[1].str()), type);
      if (!same_value(res->value, expected)) {
        failures.push_back("value " + res->value.dump() + ", expected " + expected.dump() +
                           " (reason " + std::string(reason_name(res->reason)) + " " +
                           res->error_message + ")");
      }
    } else if (std::regex_match(step.text, m, kReason)) {
      if (!need_result()) continue;
      if (reason_name(res->reason) != unquote(m[1].str())) {
        failures.push_back("reason " + std::string(reason_name(res->reason)) + ", expected " +
                           unquote(m[1].str()));
      }
    } else if (std::regex_match(step.text, m, kErrorCode)) {
      if (!need_result()) continue;
      if (error_code_name(res->error_code) != unquote(m[1].str())) {
        failures.push_back("error code " + std::string(error_code_name(res->error_code)) +
                           ", expected " + unquote(m[1].str()));
      }
    } else if (std::regex_match(step.text, m, kMetaContains)) {
      if (!need_result()) continue;
      for (std::size_t r = 1; r < step.table.size(); ++r) {
        const auto& row = step.table[r];  // key | metadata_type | value
        const Json expected = typed_value(row[2], row[1]);
        const auto it = res->metadata().find(row[0]);
        if (it == res->metadata().end() || !same_value(*it, expected) ||
            it->is_number() != expected.is_number()) {
          failures.push_back("metadata " + row[0] + " = " +
                             (it == res->metadata().end() ? "absent" : it->dump()) + ", expected " +
                             expected.dump());
        }
      }
    } else if (std::regex_match(step.text, m, kMetaEmpty)) {
      if (!need_result()) continue;
      if (!res->metadata().empty()) failures.push_back("metadata " + res->metadata().dump());
    } else {
      failures.push_back("unknown step: " + step.text);
    }
  }
  return failures;
}

std::string testbed_dir() {
  if (const char* env = std::getenv("MEMSNAP_FLAGD_TESTBED")) return env;
  return MEMSNAP_FLAGD_TESTBED_DIR;
}

TEST(FlagdConformance, AllApplicableScenariosPass) {
  const std::string dir = testbed_dir();
  const LoadResult loaded = load_flag_source(dir + "/flags/testkit-flags.json");
  ASSERT_TRUE(loaded.ok()) << loaded.error_text();

  std::vector<std::string> features;
  for (const auto& e : std::filesystem::directory_iterator(dir + "/gherkin")) {
    if (e.path().extension() == ".feature") features.push_back(e.path().string());
  }
  std::sort(features.begin(), features.end());
  ASSERT_FALSE(features.empty()) << "no .feature files in " << dir << "/gherkin";

  const std::set<std::string> skipped_tags = {"@fractional-v1", "@fractional-v3"};
  int total = 0;
  int skipped = 0;
  int passed = 0;
  for (const auto& path : features) {
    for (const Scenario& sc : expand(parse_feature(path))) {
      ++total;
      const bool skip = std::any_of(sc.tags.begin(), sc.tags.end(),
                                    [&](const std::string& t) { return skipped_tags.count(t); });
      if (skip) {
        ++skipped;
        continue;
      }
      const auto failures = run(sc, *loaded.flags);
      if (failures.empty()) {
        ++passed;
      } else {
        for (const auto& f : failures) ADD_FAILURE() << sc.id << ": " << f;
      }
    }
  }
  const int applicable = total - skipped;
  std::printf(
      "flagd-testbed conformance: %d/%d applicable scenarios passed (%d expanded, %d "
      "skipped: @fractional-v1, @fractional-v3)\n",
      passed, applicable, total, skipped);
  EXPECT_EQ(applicable, 125);
  EXPECT_EQ(passed, applicable);
}

}  // namespace
}  // namespace memsnap::flags
