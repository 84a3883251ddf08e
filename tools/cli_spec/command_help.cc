// The help and the man page of a command table (command_table.h): text generated from the same
// Option records that check() accepts.
#include <sstream>

#include "tools/cli_spec/command_table.h"

namespace memsnap::cli_spec {
namespace {

constexpr std::size_t kWidth = 80;
constexpr std::size_t kOptionColumn = 28;

std::string option_words(const Option& o) {
  const std::string v = value_name(o);
  return v.empty() ? o.name : o.name + " " + v;
}

// The option's help with what the table knows about it (default, choices, repeatable).
std::string option_help(const Option& o) {
  std::string text = o.help;
  if (o.required) text += " (required)";
  if (o.repeatable) text += " (repeatable)";
  if (!o.default_text.empty()) text += " (default: " + o.default_text + ")";
  return text;
}

std::vector<std::string> split_words(const std::string& text) {
  std::vector<std::string> out;
  std::istringstream in(text);
  for (std::string w; in >> w;) out.push_back(w);
  return out;
}

// Words of text wrapped to kWidth, every line after the first starting at column `indent`.
std::string wrap(const std::string& text, std::size_t first_column, std::size_t indent) {
  std::string out;
  std::size_t column = first_column;
  bool line_start = true;
  for (const auto& w : split_words(text)) {
    if (!line_start && column + 1 + w.size() > kWidth) {
      out += "\n" + std::string(indent, ' ');
      column = indent;
      line_start = true;
    }
    if (!line_start) {
      out += " ";
      ++column;
    }
    out += w;
    column += w.size();
    line_start = false;
  }
  return out;
}

std::vector<std::string> paragraphs(const std::string& text) {
  std::vector<std::string> out;
  std::string current;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) {
    if (line.find_first_not_of(' ') == std::string::npos) {
      if (!current.empty()) out.push_back(current);
      current.clear();
    } else {
      current += (current.empty() ? "" : " ") + line;
    }
  }
  if (!current.empty()) out.push_back(current);
  return out;
}

std::string synopsis(const Program& program, const Command& c) {
  std::string head = program.name + (c.mode == Mode::kClient ? " --socket PATH " : " ") + c.name;
  if (!c.synopsis.empty()) return head + " " + c.synopsis;
  bool optional = false;
  for (const auto& o : c.options) {
    if (o.required) {
      head += " " + option_words(o);
    } else {
      optional = true;
    }
  }
  if (!c.positional.name.empty()) {
    const std::string p = c.positional.name + (c.positional.max < 0 ? "..." : "");
    head += c.positional.min > 0 ? " " + p : " [" + p + "]";
  }
  return optional ? head + " [options]" : head;
}

void option_lines(std::ostringstream& out, const std::vector<Option>& options) {
  for (const auto& o : options) {
    std::string left = "  " + option_words(o);
    if (left.size() + 2 > kOptionColumn) {
      out << left << "\n" << std::string(kOptionColumn, ' ');
    } else {
      out << left << std::string(kOptionColumn - left.size(), ' ');
    }
    out << wrap(option_help(o), kOptionColumn, kOptionColumn) << "\n";
  }
}

// troff: a backslash is \e, a minus \-, and a line must not start with . or '.
std::string roff(const std::string& text) {
  std::string out;
  for (char ch : text) {
    if (ch == '\\') {
      out += "\\e";
    } else if (ch == '-') {
      out += "\\-";
    } else {
      out += ch;
    }
  }
  return out;
}

std::string roff_line(const std::string& text) {
  const std::string r = roff(text);
  return !r.empty() && (r[0] == '.' || r[0] == '\'') ? "\\&" + r : r;
}

void man_options(std::ostringstream& out, const std::vector<Option>& options) {
  for (const auto& o : options) {
    if (o.kind == ValueKind::kFlag) {
      out << ".TP\n.B " << roff(o.name) << "\n";
    } else {
      out << ".TP\n.BI \"" << roff(o.name) << " \" \"" << roff(value_name(o)) << "\"\n";
    }
    out << roff_line(option_help(o)) << "\n";
  }
}

void man_command(std::ostringstream& out, const Program& program, const Command& c) {
  out << ".SS \"" << roff(c.name) << "\"\n" << roff_line(c.summary) << "\n.PP\n.nf\n"
      << roff_line(wrap(synopsis(program, c), 0, 4)) << "\n.fi\n";
  for (const auto& p : paragraphs(c.description)) out << ".PP\n" << roff_line(p) << "\n";
  if (!c.positional.help.empty()) {
    out << ".PP\n" << roff_line(c.positional.name + ": " + c.positional.help) << "\n";
  }
  man_options(out, c.options);
}

}  // namespace

std::string help_text(const Program& program, const std::vector<const Command*>& forms) {
  std::ostringstream out;
  for (std::size_t i = 0; i < forms.size(); ++i) {
    const Command& c = *forms[i];
    out << (i == 0 ? "" : "\n") << "usage: " << wrap(synopsis(program, c), 7, 11) << "\n\n";
    out << wrap(c.summary, 0, 0) << "\n";
    for (const auto& p : paragraphs(c.description)) out << "\n" << wrap(p, 0, 0) << "\n";
    if (!c.positional.help.empty()) {
      out << "\n" << wrap(c.positional.name + ": " + c.positional.help, 0, 0) << "\n";
    }
    out << "\noptions:\n";
    option_lines(out, c.options);
    out << "  -h, --help" << std::string(kOptionColumn - 12, ' ') << "this help\n";
  }
  return out.str();
}

std::string overview(const Program& program) {
  std::ostringstream out;
  out << "usage: " << program.name << " " << program.synopsis << "\n\n"
      << wrap(program.description, 0, 0) << "\n";
  for (const Mode mode : {Mode::kLocal, Mode::kClient}) {
    bool any = false;
    for (const auto& c : program.commands) {
      if (c.mode != mode) continue;
      if (!any) {
        out << (mode == Mode::kLocal ? "\ncommands:\n"
                                     : "\nclient commands (" + program.name +
                                           " --socket PATH COMMAND: memsnapd does the work):\n");
      }
      any = true;
      std::string left = "  " + c.name;
      left += std::string(left.size() < 22 ? 22 - left.size() : 1, ' ');
      out << left << wrap(c.summary, left.size(), 22) << "\n";
    }
  }
  if (!program.options.empty()) {
    out << "\noptions:\n";
    option_lines(out, program.options);
  }
  for (const auto& s : program.sections) {
    out << "\n" << s.title << ":\n";
    for (const auto& p : paragraphs(s.text)) out << "  " << wrap(p, 2, 2) << "\n";
  }
  return out.str();
}

std::string man_page(const Program& program, const std::string& version) {
  std::string upper;
  for (char ch : program.name) upper += static_cast<char>(ch >= 'a' && ch <= 'z' ? ch - 32 : ch);
  std::ostringstream out;
  out << ".TH " << upper << " " << program.man_section << " \"\" \"" << program.name << " "
      << version << "\" \"memsnap manual\"\n"
      << ".SH NAME\n" << roff(program.name) << " \\- " << roff_line(program.summary) << "\n"
      << ".SH SYNOPSIS\n.B " << roff(program.name) << "\n" << roff_line(program.synopsis) << "\n"
      << ".SH DESCRIPTION\n";
  for (const auto& p : paragraphs(program.description)) out << ".PP\n" << roff_line(p) << "\n";
  if (!program.options.empty()) {
    out << ".SH OPTIONS\n";
    man_options(out, program.options);
  }
  for (const Mode mode : {Mode::kLocal, Mode::kClient}) {
    bool any = false;
    for (const auto& c : program.commands) {
      if (c.mode != mode) continue;
      if (!any) out << (mode == Mode::kLocal ? ".SH COMMANDS\n" : ".SH CLIENT COMMANDS\n");
      any = true;
      man_command(out, program, c);
    }
  }
  for (const auto& s : program.sections) {
    std::string title;
    for (char ch : s.title) title += static_cast<char>(ch >= 'a' && ch <= 'z' ? ch - 32 : ch);
    out << ".SH \"" << roff(title) << "\"\n";
    for (const auto& p : paragraphs(s.text)) out << ".PP\n" << roff_line(p) << "\n";
  }
  return out.str();
}

}  // namespace memsnap::cli_spec
