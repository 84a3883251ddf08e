// libFuzzer target: flag EVALUATION under the budgets of flags/budgets.h (issue 26 item 6). The
// input is a targeting rule, its $evaluators and a context; the rule is put in a flag, loaded
// strictly, dry-run as `memsnap flags check` does, and evaluated. Where flags_fuzz mostly finds
// texts that do not load, every input here that is JSON reaches the evaluator, so the fuzzer
// spends its time looking for a rule that escapes a budget: an evaluation that takes more than
// libFuzzer's -timeout or -rss_limit_mb (tools/fuzz.sh: 25 s, 2 GB) is a finding, as is an
// exception or a resolution that breaks the evaluator's contract (checked below; abort()).
//
// Input: [control byte] [rule JSON] '\0' [$evaluators JSON, an object] '\0' [context JSON].
// Missing or unparsable parts are: rule null, no evaluators, context {}. Control bits: 0 explain,
// 1 ask for a boolean (else no type), 2 a second context with a targetingKey.
// Built as a fuzzer with MEMSNAP_FUZZ=ON and, always, as flags_eval_fuzz_corpus_test (the corpus
// in flags/eval-fuzz-corpus, the budget bombs among it, replayed as an ordinary test).
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>

#include "flags/flag_set.h"

namespace {

using memsnap::flags::check_evaluation_budgets;
using memsnap::flags::ErrorCode;
using memsnap::flags::EvalOptions;
using memsnap::flags::FlagType;
using memsnap::flags::Json;
using memsnap::flags::LoadOptions;
using memsnap::flags::Reason;
using memsnap::flags::Resolution;

std::optional<Json> parse(std::string_view text) {
  Json j = Json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return std::nullopt;
  return j;
}

// The next NUL-terminated part of rest (all of it when there is no NUL).
std::string_view take_part(std::string_view& rest) {
  const std::size_t nul = rest.find('\0');
  const std::string_view part = rest.substr(0, nul);
  rest = nul == std::string_view::npos ? std::string_view() : rest.substr(nul + 1);
  return part;
}

void check(bool ok) {
  if (!ok) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 1 || size > 16 * 1024) return 0;
  const std::uint8_t control = data[0];
  std::string_view rest(reinterpret_cast<const char*>(data + 1), size - 1);
  const std::optional<Json> rule = parse(take_part(rest));
  const std::optional<Json> evaluators = parse(take_part(rest));
  std::optional<Json> context = parse(take_part(rest));
  if (!rule || rule->is_null()) return 0;
  if (!context || !context->is_object()) context = Json::object();

  // Variants named as the results a rule most often gives (one type per flag, or it is a flag
  // error): booleans when a boolean is asked for, else strings.
  const bool boolean = (control & 2) != 0;
  Json source = {{"flags",
                  {{"f",
                    {{"state", "ENABLED"},
                     {"variants", boolean ? Json{{"true", true}, {"false", false}}
                                          : Json{{"a", "a"}, {"b", "b"}, {"1", "1"}, {"0", "0"}}},
                     {"defaultVariant", boolean ? "false" : "a"},
                     {"targeting", *rule}}}}}};
  if (evaluators && evaluators->is_object()) source["$evaluators"] = *evaluators;

  LoadOptions options;
  options.strict = true;
  const auto loaded = memsnap::flags::load_flag_text(source.dump(), "fuzz.json", options);
  (void)loaded.error_text();
  if (!loaded.ok()) return 0;
  for (const auto& d : check_evaluation_budgets(*loaded.flags)) (void)d.to_string();

  EvalOptions eval;
  eval.explain = (control & 1) != 0;
  eval.timestamp = 1700000000;
  const Json fallback = "fuzz-default";
  const std::optional<FlagType> type =
      boolean ? std::optional<FlagType>(FlagType::kBoolean) : std::nullopt;
  Json second = *context;
  second["targetingKey"] = "sb-" + std::to_string(size);
  for (const Json* ctx : {&*context, &second}) {
    if (ctx == &second && (control & 4) == 0) break;
    Resolution r;
    try {
      r = loaded.flags->evaluate("f", *ctx, type, fallback, eval);
    } catch (...) {
      std::abort();  // FlagSet::evaluate never throws
    }
    // The contract: an error gives the caller's default with a message; a budget error is GENERAL.
    if (r.reason == Reason::kError) {
      check(r.value == fallback);
      check(r.error_code != ErrorCode::kNone && !r.error_message.empty());
      if (r.error_message.find("evaluation budget") != std::string::npos) {
        check(r.error_code == ErrorCode::kGeneral);
      }
    } else {
      check(r.error_code == ErrorCode::kNone);
    }
    (void)r.value.dump();
    (void)r.trace.dump();
  }
  return 0;
}
