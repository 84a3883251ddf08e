// A program's command line as data: its commands, each with its options, their kinds and help.
// One table per program (memsnap: tools/memsnap/commands.cc, memsnapd: its main.cc) gives
//   - the argument check every command passes before it does any work (check()): unknown options
//     with a "did you mean", missing values, values of the wrong kind (a size, a fraction, an
//     integer in range, one of a set, JSON, KEY=VALUE), repeats, the count of positional words;
//   - `--help` of every command, the program's overview, and its man page (troff), so the help
//     and the man page cannot drift from what is accepted.
// Checks that need more than the words (a strategy that is not loaded, a size larger than a
// guest) stay with the command, before its first side effect.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace memsnap::cli_spec {

enum class ValueKind {
  kFlag,      // no value
  kText,      // any non-empty word
  kPath,      // a file or directory name (non-empty)
  kSize,      // bytes: 4096, 64K, 2M, 1G, 0x1000; at least `min`, at most `max` (0: no limit),
              // a multiple of `multiple_of` (0: any)
  kInteger,   // a decimal whole number in [min, max] (max 0: kIntegerMax)
  kNumber,    // a decimal number in [min, max] (max 0: kNumberMax)
  kFraction,  // a decimal number in [0, 1]
  kChoice,    // one of `choices`
  kJson,      // a JSON document
  kKeyValue,  // KEY=VALUE
};

struct Option {
  std::string name;         // "--size"
  ValueKind kind = ValueKind::kFlag;
  std::string placeholder;  // "BYTES" (the value's name in help; kChoice shows its choices)
  std::string help;         // one or two sentences
  std::string default_text; // shown as "(default: ...)"; empty: none
  std::vector<std::string> choices;  // kChoice
  double min = 0;
  double max = 0;
  bool repeatable = false;
  bool required = false;
  double multiple_of = 0;
};

// The bound of an integer or number with no max of its own: every command reads its value into
// an int, long or double without overflow (a pid is bounded lower, by its table).
inline constexpr double kIntegerMax = 2147483647;
inline constexpr double kNumberMax = 1e9;

// The value's name in help and messages: its placeholder, a kChoice's choices, else VALUE.
std::string value_name(const Option& option);

struct Positional {
  std::string name;  // "FILE", "ID"; empty: the command takes none
  int min = 0;
  int max = 0;  // -1: any number
  std::string help;
};

enum class Mode {
  kLocal,   // does the work in this process
  kClient,  // asks memsnapd (memsnap --socket PATH COMMAND)
};

struct Command {
  std::string name;      // "cycle", "experiment run": a group's subcommands share its first word
  Mode mode = Mode::kLocal;
  std::string summary;   // one line, for the overview
  std::string synopsis;  // the usage line's arguments; empty: generated from the options
  std::string description;  // paragraphs (blank-line separated), for --help and the man page
  std::vector<Option> options;
  Positional positional;
};

struct Section {  // a titled paragraph of the overview and the man page (EXIT STATUS, SIGNALS...)
  std::string title;
  std::string text;
};

struct Program {
  std::string name;     // "memsnap"
  int man_section = 1;
  std::string summary;  // the man page's NAME line
  std::string synopsis;
  std::string description;
  std::vector<Option> options;  // the program's own (--version, --socket); commands own theirs
  std::vector<Command> commands;
  std::vector<Section> sections;
};

// The commands named `words[0]`, or `words[0] words[1]` for a group ("experiment run"), in the
// given mode. `used` is set to the number of words the name took (1 or 2).
const Command* find_command(const Program& program, const std::vector<std::string>& words,
                            Mode mode, int* used);
// The subcommand names of a group ("experiment" -> run, report); empty when `word` is no group.
std::vector<std::string> subcommands(const Program& program, const std::string& word);
// The name (of candidates) closest to `word` when it is a plausible misspelling, else empty.
std::string closest(const std::string& word, const std::vector<std::string>& candidates);

// What check() found.
struct CheckResult {
  bool help = false;  // --help or -h was given: print help, do nothing else
  std::string error;  // empty: the words are acceptable
};
// Checks the words after the command's name against its table (see the header comment).
CheckResult check(const Command& command, const std::vector<std::string>& words);
// The same for one value; empty when it is acceptable.
std::string check_value(const Option& option, const std::string& value);

// "4096", "64K", "2M", "1G", "0x1000", "4KiB": bytes. Empty optional when it is not a size.
std::optional<std::uint64_t> parse_size(const std::string& text);

// `memsnap COMMAND --help`: every form of the command (local and client), its options.
std::string help_text(const Program& program, const std::vector<const Command*>& forms);
// `memsnap --help`: the commands, one line each, and the program's sections.
std::string overview(const Program& program);
// The man page, in troff (man(7) macros).
std::string man_page(const Program& program, const std::string& version);

}  // namespace memsnap::cli_spec
