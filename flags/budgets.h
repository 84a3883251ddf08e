// Budgets that bound the memory and time a flag source may cost, however small its text
// (issue 26 item 6; docs/flags.md, "Budgets"). A YAML alias expands to a copy of what it names at
// every use, a $ref is used many times, and JsonLogic can build values that double per step, so
// the size of the text bounds nothing by itself. Every budget is counted while the work is done and
// refused at the first unit past it, with a diagnostic (loading) or an ERROR resolution
// (evaluation); none of them is ever met by a reasonable flag file.
#pragma once

#include <cstddef>
#include <cstdint>

namespace memsnap::flags {

// Values in one parsed document (JSON or YAML), every YAML alias counted at each use as the
// converter expands it. A document over it is rejected ("more than N values").
inline constexpr std::size_t kMaxDocumentNodes = 1'000'000;

// Compiled JsonLogic nodes of one document's rules together (every flag's targeting plus each
// $evaluators entry, compiled once and shared by all of its $refs). Past it, the flag whose rule
// crossed it is a flag error.
inline constexpr std::size_t kMaxCompiledNodes = 1'000'000;

// Work units of one evaluation of one flag's targeting: one per operation evaluated, plus one per
// element (or per 64 bytes of a string) that an operation scans or builds. Past it, the
// evaluation stops and the flag resolves to the caller's default with reason ERROR (GENERAL).
inline constexpr std::uint64_t kMaxEvaluationSteps = 1'000'000;

// Values (one per JSON value, strings one more per 64 bytes) that one evaluation may build or
// copy: this bounds the memory an evaluation holds (merge, map, reduce and cat copy their
// inputs). Past it, as for kMaxEvaluationSteps.
inline constexpr std::uint64_t kMaxEvaluationValues = 262'144;

}  // namespace memsnap::flags
