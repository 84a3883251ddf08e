#include "flags/document.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <iterator>
#include <regex>
#include <vector>

#include <yaml-cpp/yaml.h>

#include "flags/budgets.h"
#include "text/utf8.h"

namespace memsnap::flags {
namespace {

std::string too_many_values_message() {
  return "more than " + std::to_string(kMaxDocumentNodes) +
         " values (YAML aliases count at every use; flags/budgets.h)";
}

// Maps byte offsets to 1-based line and column.
class LineIndex {
 public:
  explicit LineIndex(std::string_view text) {
    starts_.push_back(0);
    for (std::size_t i = 0; i < text.size(); ++i) {
      if (text[i] == '\n') starts_.push_back(i + 1);
    }
  }
  Position at(std::size_t offset) const {
    const auto it = std::upper_bound(starts_.begin(), starts_.end(), offset);
    const std::size_t line = static_cast<std::size_t>(it - starts_.begin());
    return {static_cast<int>(line), static_cast<int>(offset - starts_[line - 1] + 1)};
  }

 private:
  std::vector<std::size_t> starts_;
};

// An input iterator over the text that remembers the last character nlohmann's lexer read, so the
// SAX callbacks know where in the text they are.
class TrackingIterator {
 public:
  using iterator_category = std::input_iterator_tag;
  using value_type = char;
  using difference_type = std::ptrdiff_t;
  using pointer = const char*;
  using reference = const char&;

  TrackingIterator() = default;
  TrackingIterator(const char* p, const char** last) : p_(p), last_(last) {}
  reference operator*() const {
    *last_ = p_;
    return *p_;
  }
  TrackingIterator& operator++() {
    ++p_;
    return *this;
  }
  TrackingIterator operator++(int) {
    TrackingIterator old = *this;
    ++p_;
    return old;
  }
  bool operator==(const TrackingIterator& o) const { return p_ == o.p_; }
  bool operator!=(const TrackingIterator& o) const { return p_ != o.p_; }

 private:
  const char* p_ = nullptr;
  const char** last_ = nullptr;
};

// Builds the document with positions, refusing depth beyond kMaxDocumentDepth and duplicate keys.
class PositionSax {
 public:
  PositionSax(std::string_view text, const char** last, Document& doc)
      : text_(text), last_(last), lines_(text), doc_(doc) {}

  bool null() { return scalar(nullptr, ScalarKind::kLiteral, 4); }
  bool boolean(bool v) { return scalar(v, ScalarKind::kLiteral, v ? 4 : 5); }
  bool number_integer(Json::number_integer_t v) { return scalar(v, ScalarKind::kNumber, 0); }
  bool number_unsigned(Json::number_unsigned_t v) { return scalar(v, ScalarKind::kNumber, 0); }
  bool number_float(Json::number_float_t v, const Json::string_t&) {
    return scalar(v, ScalarKind::kNumber, 0);
  }
  bool string(Json::string_t& v) { return scalar(std::move(v), ScalarKind::kString, 0); }
  bool binary(Json::binary_t&) { return fail("binary values are not JSON"); }

  bool start_object(std::size_t) { return open(Json::object()); }
  bool start_array(std::size_t) { return open(Json::array()); }
  bool end_object() { return close(); }
  bool end_array() { return close(); }

  bool key(Json::string_t& k) {
    Json& obj = *stack_.back().value;
    const std::size_t start = string_start(current_offset());
    if (obj.contains(k)) {
      error_offset_ = start;
      error_ = "duplicate key \"" + k + "\"";
      return false;
    }
    key_ = std::move(k);
    key_offset_ = start;
    has_key_ = true;
    return true;
  }

  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception& ex) {
    if (error_.empty()) {
      error_offset_ = current_offset();
      std::string what = ex.what();
      // "[json.exception.parse_error.101] parse error at line 1, column 5: syntax error ..."
      if (const auto col = what.find("column "); col != std::string::npos) {
        if (const auto colon = what.find(": ", col); colon != std::string::npos) {
          what = what.substr(colon + 2);
        }
      }
      error_ = what;
    }
    return false;
  }

  bool fail(std::string message) {
    error_offset_ = current_offset();
    error_ = std::move(message);
    return false;
  }
  const std::string& error() const { return error_; }
  Position error_position() const { return lines_.at(error_offset_); }

 private:
  enum class ScalarKind { kLiteral, kNumber, kString };
  struct Frame {
    Json* value;
    std::vector<Position> element_positions;  // arrays: recorded once the array is complete
  };

  std::size_t current_offset() const {
    return *last_ == nullptr ? 0 : static_cast<std::size_t>(*last_ - text_.data());
  }

  // The offset of the opening quote of the string whose closing quote is at `end`.
  std::size_t string_start(std::size_t end) const {
    for (std::size_t i = end; i-- > 0;) {
      if (text_[i] != '"') continue;
      std::size_t backslashes = 0;
      while (i - backslashes > 0 && text_[i - backslashes - 1] == '\\') ++backslashes;
      if (backslashes % 2 == 0) return i;
    }
    return end;
  }

  std::size_t scalar_start(ScalarKind kind, std::size_t literal_len) const {
    const std::size_t at = current_offset();
    switch (kind) {
      case ScalarKind::kString:
        return string_start(at);
      case ScalarKind::kLiteral:
        return at + 1 >= literal_len ? at + 1 - literal_len : 0;
      case ScalarKind::kNumber: {
        auto is_num = [](char c) {
          return (c >= '0' && c <= '9') || c == '-' || c == '+' || c == '.' || c == 'e' || c == 'E';
        };
        // The lexer reads one character past a number unless the text ends with it.
        std::size_t i = is_num(text_[at]) && at + 1 == text_.size() ? at + 1 : at;
        while (i > 0 && is_num(text_[i - 1])) --i;
        return i;
      }
    }
    return at;
  }

  // Where the next value goes: the root, the end of the current array, or under the last key.
  // Array elements may still move (the vector grows), so their positions are recorded when the
  // array closes; object members and the root are recorded now.
  Json* place(Json value, std::size_t offset) {
    ++nodes_;
    const Position pos = lines_.at(offset);
    if (stack_.empty()) {
      doc_.root = std::move(value);
      doc_.root_position = pos;
      return &doc_.root;
    }
    Frame& top = stack_.back();
    Json& parent = *top.value;
    if (parent.is_array()) {
      parent.push_back(std::move(value));
      top.element_positions.push_back(pos);
      return &parent.back();
    }
    Json* out = &parent[key_];
    *out = std::move(value);
    has_key_ = false;
    doc_.key_positions.emplace_back(out, lines_.at(key_offset_));
    doc_.value_positions.emplace_back(out, pos);
    return out;
  }

  // A JSON text holds fewer values than bytes, but a file has no size limit of its own.
  bool over_budget() {
    if (nodes_ < kMaxDocumentNodes) return false;
    error_offset_ = current_offset();
    error_ = too_many_values_message();
    return true;
  }

  template <typename T>
  bool scalar(T&& v, ScalarKind kind, std::size_t literal_len) {
    if (over_budget()) return false;
    place(Json(std::forward<T>(v)), scalar_start(kind, literal_len));
    return true;
  }

  bool open(Json container) {
    if (static_cast<int>(stack_.size()) >= kMaxDocumentDepth) {
      error_offset_ = current_offset();
      error_ = "nesting deeper than " + std::to_string(kMaxDocumentDepth) + " levels";
      return false;
    }
    if (over_budget()) return false;
    Json* out = place(std::move(container), current_offset());
    stack_.push_back({out, {}});
    return true;
  }

  bool close() {
    Frame& top = stack_.back();
    if (top.value->is_array()) {
      for (std::size_t i = 0; i < top.element_positions.size(); ++i) {
        doc_.value_positions.emplace_back(&(*top.value)[i], top.element_positions[i]);
      }
    }
    stack_.pop_back();
    return true;
  }

  std::string_view text_;
  const char** last_;
  LineIndex lines_;
  Document& doc_;
  std::vector<Frame> stack_;
  std::string key_;
  std::size_t key_offset_ = 0;
  bool has_key_ = false;
  std::string error_;
  std::size_t error_offset_ = 0;
  std::size_t nodes_ = 0;
};

bool parse_json(const std::string& text, Document& doc, Diagnostic* error) {
  const char* last = nullptr;
  PositionSax sax(text, &last, doc);
  bool ok = false;
  try {
    ok = Json::sax_parse(TrackingIterator(text.data(), &last),
                         TrackingIterator(text.data() + text.size(), &last), &sax);
  } catch (const std::exception& e) {
    if (sax.error().empty()) sax.fail(std::string("invalid JSON: ") + e.what());
  }
  if (ok) {
    doc.index_positions();
    return true;
  }
  const Position p = sax.error_position();
  *error = {Diagnostic::Severity::kError, doc.file, p.line, p.col,
            "invalid JSON: " + (sax.error().empty() ? std::string("parse error") : sax.error())};
  return false;
}

// YAML 1.2 core schema resolution of a plain (unquoted) scalar.
Json resolve_plain_scalar(const std::string& s) {
  if (s.empty() || s == "~" || s == "null" || s == "Null" || s == "NULL") return nullptr;
  if (s == "true" || s == "True" || s == "TRUE") return true;
  if (s == "false" || s == "False" || s == "FALSE") return false;
  static const std::regex kInt("[-+]?[0-9]+");
  static const std::regex kFloat(R"([-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?)");
  if (std::regex_match(s, kInt)) {
    errno = 0;
    char* end = nullptr;
    if (s[0] == '-') {
      const long long v = std::strtoll(s.c_str(), &end, 10);
      if (errno == 0) return v;
    } else {
      const unsigned long long v = std::strtoull(s.c_str(), &end, 10);
      if (errno == 0) {
        if (v <= static_cast<unsigned long long>(INT64_MAX)) return static_cast<std::int64_t>(v);
        return v;
      }
    }
    return std::strtod(s.c_str(), nullptr);
  }
  if (std::regex_match(s, kFloat)) {
    const double d = std::strtod(s.c_str(), nullptr);
    if (std::isfinite(d)) return d;
  }
  return s;
}

struct YamlConverter {
  Document& doc;
  Diagnostic* error;
  std::size_t nodes = 0;  // converted so far: an alias is converted again at every use

  Diagnostic at(const YAML::Mark& m, std::string message) const {
    return {Diagnostic::Severity::kError, doc.file, m.line + 1, m.column + 1, std::move(message)};
  }

  // Converts node into out, which stays where it is (so its address can index its position).
  bool convert(const YAML::Node& node, Json& out, int depth) {
    const YAML::Mark mark = node.Mark();
    const Position pos{mark.line + 1, mark.column + 1};
    if (depth == 0) {
      doc.root_position = pos;
    } else {
      doc.value_positions.emplace_back(&out, pos);
    }
    if (depth > kMaxDocumentDepth) {
      *error = at(mark, "nesting deeper than " + std::to_string(kMaxDocumentDepth) + " levels");
      return false;
    }
    if (++nodes > kMaxDocumentNodes) {
      *error = at(mark, too_many_values_message());
      return false;
    }
    switch (node.Type()) {
      case YAML::NodeType::Undefined:
      case YAML::NodeType::Null:
        out = nullptr;
        return true;
      case YAML::NodeType::Scalar: {
        const std::string& tag = node.Tag();
        if (tag == "!" || tag == "tag:yaml.org,2002:str") {
          out = node.Scalar();
        } else {
          out = resolve_plain_scalar(node.Scalar());
        }
        return true;
      }
      case YAML::NodeType::Sequence: {
        out = Json::array();
        out.get_ref<Json::array_t&>().resize(node.size());  // no reallocation from here on
        std::size_t i = 0;
        for (const auto& child : node) {
          if (!convert(child, out[i++], depth + 1)) return false;
        }
        return true;
      }
      case YAML::NodeType::Map: {
        out = Json::object();
        for (const auto& kv : node) {
          if (!kv.first.IsScalar()) {
            *error = at(kv.first.Mark(), "mapping keys must be strings");
            return false;
          }
          const std::string& key = kv.first.Scalar();
          if (out.contains(key)) {
            *error = at(kv.first.Mark(), "duplicate key \"" + key + "\"");
            return false;
          }
          Json& slot = out[key];
          doc.key_positions.emplace_back(
              &slot, Position{kv.first.Mark().line + 1, kv.first.Mark().column + 1});
          if (!convert(kv.second, slot, depth + 1)) return false;
        }
        return true;
      }
    }
    return true;
  }
};

bool parse_yaml(const std::string& text, Document& doc, Diagnostic* error) {
  // JSON sources are checked by nlohmann's parser; yaml-cpp lets any bytes through into strings
  // that nlohmann::json::dump() then throws on (found by flags_fuzz).
  if (const std::size_t bad = first_invalid_utf8(text); bad != std::string::npos) {
    const std::string_view before(text.data(), bad);
    const std::size_t nl = before.rfind('\n');
    *error = {Diagnostic::Severity::kError, doc.file,
              static_cast<int>(std::count(before.begin(), before.end(), '\n')) + 1,
              static_cast<int>(nl == std::string_view::npos ? bad + 1 : bad - nl),
              "invalid YAML: not valid UTF-8 text"};
    return false;
  }
  YAML::Node node;
  try {
    node = YAML::Load(text);
  } catch (const YAML::ParserException& e) {
    *error = {Diagnostic::Severity::kError, doc.file, e.mark.line + 1, e.mark.column + 1,
              "invalid YAML: " + e.msg};
    return false;
  } catch (const std::exception& e) {
    *error = {Diagnostic::Severity::kError, doc.file, 0, 0,
              std::string("invalid YAML: ") + e.what()};
    return false;
  }
  YamlConverter conv{doc, error};
  if (!conv.convert(node, doc.root, 0)) return false;
  doc.index_positions();
  return true;
}

bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

}  // namespace

std::string pointer_append(std::string_view base, std::string_view token) {
  std::string out(base);
  out.reserve(base.size() + token.size() + 1);
  out += '/';
  for (char c : token) {
    if (c == '~') {
      out += "~0";
    } else if (c == '/') {
      out += "~1";
    } else {
      out += c;
    }
  }
  return out;
}

namespace {

Position find_position(const std::vector<std::pair<const Json*, Position>>& table,
                       const Json* node) {
  const auto it = std::lower_bound(
      table.begin(), table.end(), node,
      [](const std::pair<const Json*, Position>& e, const Json* n) { return e.first < n; });
  return it != table.end() && it->first == node ? it->second : Position{};
}

}  // namespace

void Document::index_positions() {
  auto by_address = [](const auto& a, const auto& b) { return a.first < b.first; };
  std::sort(value_positions.begin(), value_positions.end(), by_address);
  std::sort(key_positions.begin(), key_positions.end(), by_address);
}

Position Document::position(std::string_view pointer) const {
  bool want_key = false;
  if (pointer.size() >= 4 && pointer.substr(pointer.size() - 4) == "#key") {
    want_key = true;
    pointer.remove_suffix(4);
  }
  // Walk the pointer from the root, remembering the deepest node whose position is known.
  const Json* node = &root;
  Position best = root_position;
  bool complete = true;
  std::size_t at = 0;
  while (at < pointer.size() && pointer[at] == '/') {
    std::size_t end = pointer.find('/', at + 1);
    if (end == std::string_view::npos) end = pointer.size();
    std::string token;
    for (std::size_t i = at + 1; i < end; ++i) {
      if (pointer[i] == '~' && i + 1 < end) {
        token += pointer[i + 1] == '1' ? '/' : '~';
        ++i;
      } else {
        token += pointer[i];
      }
    }
    at = end;
    const Json* next = nullptr;
    if (node->is_object()) {
      const auto it = node->find(token);
      if (it != node->end()) next = &*it;
    } else if (node->is_array() && !token.empty() &&
               token.find_first_not_of("0123456789") == std::string::npos &&
               std::stoull(token) < node->size()) {
      next = &(*node)[std::stoull(token)];
    }
    if (next == nullptr) {
      complete = false;
      break;
    }
    node = next;
    if (const Position p = find_position(value_positions, node); p.line > 0) best = p;
  }
  if (want_key && complete) {
    if (const Position p = find_position(key_positions, node); p.line > 0) return p;
  }
  return best;
}

Diagnostic Document::diagnostic(std::string_view pointer, std::string message,
                                Diagnostic::Severity severity) const {
  const Position p = position(pointer);
  return {severity, file, p.line, p.col, std::move(message)};
}

std::optional<Document> parse_document(std::string text, const std::string& file,
                                       SourceFormat format, Diagnostic* error) {
  Document doc;
  doc.file = file;
  std::uint64_t h = 1469598103934665603ULL;
  for (unsigned char c : text) {
    h ^= c;
    h *= 1099511628211ULL;
  }
  doc.text_hash = h;
  if (format == SourceFormat::kAuto) {
    if (ends_with(file, ".json")) {
      format = SourceFormat::kJson;
    } else if (ends_with(file, ".yaml") || ends_with(file, ".yml")) {
      format = SourceFormat::kYaml;
    } else {
      const auto first = text.find_first_not_of(" \t\r\n");
      format = first != std::string::npos && (text[first] == '{' || text[first] == '[')
                   ? SourceFormat::kJson
                   : SourceFormat::kYaml;
    }
  }
  const bool ok =
      format == SourceFormat::kJson ? parse_json(text, doc, error) : parse_yaml(text, doc, error);
  if (!ok) return std::nullopt;
  return doc;
}

}  // namespace memsnap::flags
