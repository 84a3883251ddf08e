// memsnap-flags-bench: the cost of a flag evaluation and of loading 1,000 flags, each next to a
// reference measured in the same run (a hash-map lookup; a plain JSON / YAML parse of the same
// text), so the figures can be quoted as ratios on a noisy machine.
#include <benchmark/benchmark.h>

#include <functional>
#include <string>
#include <unordered_map>
#include <vector>

#include <yaml-cpp/yaml.h>

#include "flags/flag_set.h"

namespace memsnap::flags {
namespace {

const char* kFlags = R"(
flags:
  static-flag:
    state: ENABLED
    variants: {on: true, off: false}
    defaultVariant: on
  memory-export-strategy:
    state: ENABLED
    variants: {process_vm_readv: process_vm_readv, memfd: memfd, hole_punch: hole_punch}
    defaultVariant: process_vm_readv
    targeting:
      fractional:
        - [process_vm_readv, 1]
        - [memfd, 1]
        - [hole_punch, 1]
  semver-in:
    state: ENABLED
    variants: {process_vm_readv: process_vm_readv, memfd: memfd}
    defaultVariant: process_vm_readv
    targeting:
      if:
        - and:
            - sem_ver: [{var: vmm_version}, ">=", "1.5.0"]
            - in: [{var: team}, [infra, ml, web, search, storage]]
        - memfd
        - null
)";

const FlagSet& flags() {
  static const auto set = [] {
    LoadResult r = load_flag_text(kFlags, "bench.yaml");
    if (!r.ok()) std::abort();
    return r.flags;
  }();
  return *set;
}

// 1,024 sandbox contexts as strategy selection builds them.
const std::vector<Json>& contexts() {
  static const std::vector<Json> all = [] {
    std::vector<Json> v;
    for (int i = 0; i < 1024; ++i) {
      v.push_back({{"targetingKey", "sandbox-" + std::to_string(i * 7919)},
                   {"team", i % 3 == 0 ? "infra" : "payments"},
                   {"template", "python-3.12"},
                   {"vmm", "firecracker"},
                   {"vmm_version", i % 2 == 0 ? "1.7.0" : "1.4.2"},
                   {"kernel_version", "6.1.0"},
                   {"memory_mib", 2048},
                   {"hugepages", false},
                   {"host", "host-17"},
                   {"has_memfd", true}});
    }
    return v;
  }();
  return all;
}

void BM_Reference_MapLookup(benchmark::State& state) {
  const std::unordered_map<std::string, std::string> map = {
      {"static-flag", "on"}, {"memory-export-strategy", "memfd"}, {"semver-in", "x"}};
  for (auto _ : state) {
    auto it = map.find(std::string_view("static-flag").data());
    benchmark::DoNotOptimize(it);
  }
}
BENCHMARK(BM_Reference_MapLookup);

void eval_loop(benchmark::State& state, const char* key, FlagType type, const Json& dflt) {
  const FlagSet& set = flags();
  const auto& ctx = contexts();
  std::size_t i = 0;
  for (auto _ : state) {
    Resolution r = set.evaluate(key, ctx[i++ & 1023], type, dflt);
    benchmark::DoNotOptimize(r);
  }
}

void BM_Eval_Static(benchmark::State& state) {
  eval_loop(state, "static-flag", FlagType::kBoolean, false);
}
BENCHMARK(BM_Eval_Static);

void BM_Eval_Fractional3Way(benchmark::State& state) {
  eval_loop(state, "memory-export-strategy", FlagType::kString, "process_vm_readv");
}
BENCHMARK(BM_Eval_Fractional3Way);

void BM_Eval_SemVerIn(benchmark::State& state) {
  eval_loop(state, "semver-in", FlagType::kString, "process_vm_readv");
}
BENCHMARK(BM_Eval_SemVerIn);

// 1,000 flags in the shapes a fleet has: static ones, rollouts, targeting rules.
std::string thousand_flags_json() {
  std::string out = R"({"$evaluators": {"big": {">=": [{"var": "memory_mib"}, 4096]}}, "flags": {)";
  for (int i = 0; i < 1000; ++i) {
    const std::string n = std::to_string(i);
    if (i > 0) out += ",";
    out += "\n  \"flag-" + n + R"(": {"state": "ENABLED", "variants": {"a": "alpha-)" + n +
           R"(", "b": "beta", "c": "gamma"}, "defaultVariant": "a", "metadata": {"owner": "team-)" +
           std::to_string(i % 17) + "\"}";
    if (i % 3 == 1) {
      out += R"(, "targeting": {"fractional": [["a", 10], ["b", 30], ["c", 60]]})";
    } else if (i % 3 == 2) {
      out +=
          R"(, "targeting": {"if": [{"and": [{"sem_ver": [{"var": "vmm_version"}, ">=", "1.5.0"]},
          {"in": [{"var": "team"}, ["infra", "ml"]]}, {"$ref": "big"}]}, "b",
          {"starts_with": [{"var": "host"}, "eu-"]}, "c", null]})";
    }
    out += "}";
  }
  out += "\n}}\n";
  return out;
}

std::string thousand_flags_yaml() {
  // JSON is YAML; a block-style rendering is what people write, so emit that.
  YAML::Emitter out;
  std::function<void(const Json&)> emit = [&](const Json& j) {
    if (j.is_object()) {
      out << YAML::BeginMap;
      for (const auto& [k, v] : j.items()) {
        out << YAML::Key << k << YAML::Value;
        emit(v);
      }
      out << YAML::EndMap;
    } else if (j.is_array()) {
      out << YAML::Flow << YAML::BeginSeq;
      for (const auto& v : j) emit(v);
      out << YAML::EndSeq;
    } else if (j.is_string()) {
      out << YAML::DoubleQuoted << j.get<std::string>();
    } else if (j.is_null()) {
      out << YAML::Null;
    } else {
      out << j.dump();
    }
  };
  emit(Json::parse(thousand_flags_json()));
  return out.c_str();
}

void BM_Reference_JsonParse1000(benchmark::State& state) {
  const std::string text = thousand_flags_json();
  for (auto _ : state) benchmark::DoNotOptimize(Json::parse(text));
  state.SetLabel(std::to_string(text.size()) + " bytes");
}
BENCHMARK(BM_Reference_JsonParse1000)->Unit(benchmark::kMillisecond);

void BM_Load1000Flags_Json(benchmark::State& state) {
  const std::string text = thousand_flags_json();
  for (auto _ : state) {
    LoadResult r = load_flag_text(text, "flags.json", {.strict = true});
    if (!r.ok() || r.flags->size() != 1000) state.SkipWithError("load failed");
    benchmark::DoNotOptimize(r);
  }
}
BENCHMARK(BM_Load1000Flags_Json)->Unit(benchmark::kMillisecond);

void BM_Reference_YamlParse1000(benchmark::State& state) {
  const std::string text = thousand_flags_yaml();
  for (auto _ : state) benchmark::DoNotOptimize(YAML::Load(text));
  state.SetLabel(std::to_string(text.size()) + " bytes");
}
BENCHMARK(BM_Reference_YamlParse1000)->Unit(benchmark::kMillisecond);

void BM_Load1000Flags_Yaml(benchmark::State& state) {
  const std::string text = thousand_flags_yaml();
  for (auto _ : state) {
    LoadResult r = load_flag_text(text, "flags.yaml", {.strict = true});
    if (!r.ok() || r.flags->size() != 1000) state.SkipWithError(r.error_text().c_str());
    benchmark::DoNotOptimize(r);
  }
}
BENCHMARK(BM_Load1000Flags_Yaml)->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace memsnap::flags

BENCHMARK_MAIN();
