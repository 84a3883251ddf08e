// libFuzzer target: a flag source (JSON or YAML, flagd's schema) through the loader, and, when it
// loads, every flag evaluated against a few fixed contexts and one taken from the input.
//
// Input: [format byte] [flag source text] [optional: '\0' then an evaluation context as JSON].
// The format byte's low two bits pick kAuto (file "fuzz.flags"), kJson ("fuzz.json") or kYaml
// ("fuzz.yaml"); bit 2 turns on strict loading; bit 3 asks for an explained evaluation.
// Built as a fuzzer with MEMSNAP_FUZZ=ON and, always, as flags_fuzz_corpus_test (the corpus in
// flags/fuzz-corpus replayed as an ordinary test). Nothing here touches the filesystem.
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "flags/flag_set.h"

namespace {

using memsnap::flags::EvalOptions;
using memsnap::flags::FlagType;
using memsnap::flags::Json;
using memsnap::flags::LoadOptions;
using memsnap::flags::Resolution;
using memsnap::flags::SourceFormat;

const Json& fixed_context(std::size_t i) {
  static const Json kContexts[] = {
      Json::object(),
      Json{{"targetingKey", "sb-42"},
           {"team", "infra"},
           {"memory_mib", 2048},
           {"hugepages", true},
           {"vmm_version", "1.7.0"},
           {"email", "oncall@example.com"},
           {"tags", Json::array({"a", "b"})}},
      Json{{"targetingKey", ""}, {"memory_mib", -1.5}, {"vmm_version", "v2.0.0-rc.1+build.5"},
           {"nested", {{"a", {{"b", nullptr}}}}}},
  };
  return kContexts[i];
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 1 || size > 64 * 1024) return 0;
  const std::uint8_t control = data[0];
  const std::string_view rest(reinterpret_cast<const char*>(data + 1), size - 1);
  const std::size_t nul = rest.find('\0');
  const std::string text(rest.substr(0, nul));
  std::optional<Json> input_context;
  if (nul != std::string_view::npos) {
    Json parsed = Json::parse(rest.substr(nul + 1), nullptr, /*allow_exceptions=*/false);
    if (!parsed.is_discarded()) input_context = std::move(parsed);
  }

  static constexpr SourceFormat kFormats[] = {SourceFormat::kAuto, SourceFormat::kJson,
                                              SourceFormat::kYaml, SourceFormat::kAuto};
  static const char* const kNames[] = {"fuzz.flags", "fuzz.json", "fuzz.yaml", "fuzz.yml"};
  LoadOptions options;
  options.strict = (control & 4) != 0;
  const auto loaded =
      memsnap::flags::load_flag_text(text, kNames[control & 3], options, kFormats[control & 3]);
  (void)loaded.error_text();
  for (const auto& d : loaded.diagnostics) (void)d.to_string();
  if (!loaded.ok()) return 0;

  EvalOptions eval;
  eval.explain = (control & 8) != 0;
  eval.timestamp = 1700000000;  // deterministic $flagd.timestamp
  const Json fallback = "fuzz-default";
  for (const std::string& key : loaded.flags->keys()) {
    for (std::size_t c = 0; c < 4; ++c) {
      const Json& context = c < 3 ? fixed_context(c) : (input_context ? *input_context : Json());
      if (c == 3 && !input_context) break;
      const Resolution r = loaded.flags->evaluate(key, context, std::nullopt, fallback, eval);
      (void)r.trace.dump();
      (void)r.value.dump();
    }
    // Asking for each type checks the type-mismatch paths.
    for (FlagType t : {FlagType::kBoolean, FlagType::kString, FlagType::kInteger, FlagType::kFloat,
                       FlagType::kObject}) {
      (void)loaded.flags->evaluate(key, fixed_context(1), t, fallback, eval);
    }
  }
  (void)loaded.flags->evaluate("no-such-flag", fixed_context(0), std::nullopt, fallback, eval);
  return 0;
}
