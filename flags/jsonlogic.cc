#include "flags/jsonlogic.h"

#include "flags/document.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <unordered_map>
#include <utility>

#include "flags/murmur3.h"
#include "flags/semver.h"

namespace memsnap::flags {

enum class Op : std::uint8_t {
  kLiteral,
  kArray,
  kVar,
  kMissing,
  kMissingSome,
  kIf,
  kEq,
  kStrictEq,
  kNe,
  kStrictNe,
  kLt,
  kLe,
  kGt,
  kGe,
  kNot,
  kNotNot,
  kAnd,
  kOr,
  kIn,
  kCat,
  kSubstr,
  kAdd,
  kSub,
  kMul,
  kDiv,
  kMod,
  kMin,
  kMax,
  kMerge,
  kSome,
  kAll,
  kNone,
  kMap,
  kFilter,
  kReduce,
  kFractional,
  kSemVer,
  kStartsWith,
  kEndsWith,
  kRef,  // {"$ref": name}: the shared, compiled evaluator in ref
};

struct LogicNode {
  Op op = Op::kLiteral;
  Json literal;                   // kLiteral; kArray when constant (a copy of the whole array)
  std::vector<LogicNode> args;    // operator arguments, or the elements of an array literal
  std::vector<std::string> path;  // kVar with a literal path, split at '.'
  bool literal_path = false;
  bool constant = false;  // kArray whose elements are all literals: evaluates to literal, uncopied
  int height = 0;         // levels of nodes below this one (through $refs)
  std::shared_ptr<const LogicNode> ref;  // kRef
  std::string pointer;  // where in the rule (in a shared evaluator: /$evaluators/name/...)
};

struct LogicCompileSession::State {
  struct Compiled {
    std::shared_ptr<const LogicNode> node;
    std::optional<LogicError> error;  // pointer relative to the evaluator
  };
  const Json* evaluators = nullptr;
  std::size_t max_nodes = 0;
  std::size_t nodes = 0;
  std::unordered_map<std::string, Compiled> compiled;  // by evaluator name
  std::vector<std::string> active;                     // evaluators being compiled (cycles)
};

LogicCompileSession::LogicCompileSession(const Json* evaluators, std::size_t max_nodes)
    : state_(std::make_unique<State>()) {
  state_->evaluators = evaluators;
  state_->max_nodes = max_nodes;
}
LogicCompileSession::~LogicCompileSession() = default;
std::size_t LogicCompileSession::nodes() const noexcept { return state_->nodes; }

namespace {

const std::unordered_map<std::string_view, Op>& operators() {
  static const std::unordered_map<std::string_view, Op> table = {
      {"var", Op::kVar},
      {"missing", Op::kMissing},
      {"missing_some", Op::kMissingSome},
      {"if", Op::kIf},
      {"?:", Op::kIf},
      {"==", Op::kEq},
      {"===", Op::kStrictEq},
      {"!=", Op::kNe},
      {"!==", Op::kStrictNe},
      {"<", Op::kLt},
      {"<=", Op::kLe},
      {">", Op::kGt},
      {">=", Op::kGe},
      {"!", Op::kNot},
      {"!!", Op::kNotNot},
      {"and", Op::kAnd},
      {"or", Op::kOr},
      {"in", Op::kIn},
      {"cat", Op::kCat},
      {"substr", Op::kSubstr},
      {"+", Op::kAdd},
      {"-", Op::kSub},
      {"*", Op::kMul},
      {"/", Op::kDiv},
      {"%", Op::kMod},
      {"min", Op::kMin},
      {"max", Op::kMax},
      {"merge", Op::kMerge},
      {"some", Op::kSome},
      {"all", Op::kAll},
      {"none", Op::kNone},
      {"map", Op::kMap},
      {"filter", Op::kFilter},
      {"reduce", Op::kReduce},
      {"fractional", Op::kFractional},
      {"sem_ver", Op::kSemVer},
      {"starts_with", Op::kStartsWith},
      {"ends_with", Op::kEndsWith},
  };
  return table;
}

template <typename Out>
void split_path(std::string_view path, Out& out) {
  if (path.empty()) return;
  std::size_t start = 0;
  for (;;) {
    const std::size_t dot = path.find('.', start);
    out.emplace_back(path.substr(start, dot == std::string_view::npos ? dot : dot - start));
    if (dot == std::string_view::npos) return;
    start = dot + 1;
  }
}

std::string number_to_string(double d) {
  if (std::isnan(d)) return "NaN";
  if (std::isinf(d)) return d > 0 ? "Infinity" : "-Infinity";
  if (d == std::floor(d) && std::fabs(d) < 1e21) {
    char buf[32];
    std::snprintf(buf, sizeof(buf), "%.0f", d);
    return buf;
  }
  // The shortest representation that reads back as the same double, as JavaScript prints.
  char buf[40];
  for (int precision = 1; precision <= 17; ++precision) {
    std::snprintf(buf, sizeof(buf), "%.*g", precision, d);
    if (std::strtod(buf, nullptr) == d) break;
  }
  return buf;
}

// JavaScript's String(v).
std::string to_js_string(const Json& v) {
  switch (v.type()) {
    case Json::value_t::null:
      return "null";
    case Json::value_t::boolean:
      return v.get<bool>() ? "true" : "false";
    case Json::value_t::number_integer:
      return std::to_string(v.get<std::int64_t>());
    case Json::value_t::number_unsigned:
      return std::to_string(v.get<std::uint64_t>());
    case Json::value_t::number_float:
      return number_to_string(v.get<double>());
    case Json::value_t::string:
      return v.get_ref<const std::string&>();
    case Json::value_t::array: {
      std::string out;
      bool first = true;
      for (const auto& e : v) {
        if (!first) out += ',';
        first = false;
        if (!e.is_null()) out += to_js_string(e);
      }
      return out;
    }
    default:
      return "[object Object]";
  }
}

double string_to_number(std::string_view s) {
  const auto b = s.find_first_not_of(" \t\n\r\f\v");
  if (b == std::string_view::npos) return 0;
  const auto e = s.find_last_not_of(" \t\n\r\f\v");
  const std::string t(s.substr(b, e - b + 1));
  if (t == "Infinity" || t == "+Infinity") return std::numeric_limits<double>::infinity();
  if (t == "-Infinity") return -std::numeric_limits<double>::infinity();
  const bool hex = t.size() > 2 && t[0] == '0' && (t[1] == 'x' || t[1] == 'X');
  char* end = nullptr;
  const double d = hex ? static_cast<double>(std::strtoull(t.c_str() + 2, &end, 16))
                       : std::strtod(t.c_str(), &end);
  // strtod also accepts "nan", "inf" and hex floats, which JavaScript does not.
  if (end != t.c_str() + t.size() || t.find_first_of("nNiI") != std::string::npos) {
    return std::numeric_limits<double>::quiet_NaN();
  }
  return d;
}

// JavaScript's Number(v).
double to_number(const Json& v) {
  switch (v.type()) {
    case Json::value_t::null:
      return 0;
    case Json::value_t::boolean:
      return v.get<bool>() ? 1 : 0;
    case Json::value_t::number_integer:
    case Json::value_t::number_unsigned:
    case Json::value_t::number_float:
      return v.get<double>();
    case Json::value_t::string:
      return string_to_number(v.get_ref<const std::string&>());
    case Json::value_t::array:
      return string_to_number(to_js_string(v));
    default:
      return std::numeric_limits<double>::quiet_NaN();
  }
}

// JavaScript's parseFloat(v): the longest numeric prefix of String(v).
double parse_float(const Json& v) {
  if (v.is_number()) return v.get<double>();
  const std::string s = to_js_string(v);
  const char* p = s.c_str();
  while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r') ++p;
  if (std::strncmp(p, "Infinity", 8) == 0) return std::numeric_limits<double>::infinity();
  if (std::strncmp(p, "-Infinity", 9) == 0) return -std::numeric_limits<double>::infinity();
  if (!(*p == '-' || *p == '+' || *p == '.' || (*p >= '0' && *p <= '9'))) {
    return std::numeric_limits<double>::quiet_NaN();
  }
  char* end = nullptr;
  const double d = std::strtod(p, &end);
  if (end == p) return std::numeric_limits<double>::quiet_NaN();
  return d;
}

// A number as JSON: integral values become integers; NaN and infinities (not JSON) become null.
Json number_json(double d) {
  if (!std::isfinite(d)) return nullptr;
  if (d == std::floor(d) && std::fabs(d) < 9007199254740992.0) return static_cast<std::int64_t>(d);
  return d;
}

enum class Kind { kNull, kBool, kNumber, kString, kStructured };
Kind kind_of(const Json& v) {
  if (v.is_null()) return Kind::kNull;
  if (v.is_boolean()) return Kind::kBool;
  if (v.is_number()) return Kind::kNumber;
  if (v.is_string()) return Kind::kString;
  return Kind::kStructured;
}

Json to_primitive(const Json& v) { return v.is_structured() ? Json(to_js_string(v)) : v; }

bool strict_eq(const Json& a, const Json& b) {
  const Kind ka = kind_of(a);
  if (ka != kind_of(b)) return false;
  switch (ka) {
    case Kind::kNull:
      return true;
    case Kind::kBool:
      return a.get<bool>() == b.get<bool>();
    case Kind::kNumber:
      return a.get<double>() == b.get<double>();
    case Kind::kString:
      return a.get_ref<const std::string&>() == b.get_ref<const std::string&>();
    case Kind::kStructured:
      return false;  // distinct objects in JavaScript
  }
  return false;
}

// JavaScript's abstract equality (==).
bool loose_eq(const Json& a, const Json& b, int depth = 0) {
  const Kind ka = kind_of(a);
  const Kind kb = kind_of(b);
  if (ka == kb) return strict_eq(a, b);
  if (ka == Kind::kNull || kb == Kind::kNull || depth > 4) return false;
  if (ka == Kind::kNumber && kb == Kind::kString) return a.get<double>() == to_number(b);
  if (ka == Kind::kString && kb == Kind::kNumber) return to_number(a) == b.get<double>();
  if (ka == Kind::kBool) return loose_eq(Json(to_number(a)), b, depth + 1);
  if (kb == Kind::kBool) return loose_eq(a, Json(to_number(b)), depth + 1);
  if (ka == Kind::kStructured) return loose_eq(to_primitive(a), b, depth + 1);
  if (kb == Kind::kStructured) return loose_eq(a, to_primitive(b), depth + 1);
  return false;
}

// JavaScript's a < b (or a <= b): strings compare as strings, anything else as numbers.
bool js_less(const Json& a, const Json& b, bool or_equal) {
  const Json pa = to_primitive(a);
  const Json pb = to_primitive(b);
  if (pa.is_string() && pb.is_string()) {
    const int c = pa.get_ref<const std::string&>().compare(pb.get_ref<const std::string&>());
    return or_equal ? c <= 0 : c < 0;
  }
  const double x = to_number(pa);
  const double y = to_number(pb);
  if (std::isnan(x) || std::isnan(y)) return false;
  return or_equal ? x <= y : x < y;
}

// Byte offsets of each UTF-8 code point, plus the end.
std::vector<std::size_t> code_points(const std::string& s) {
  std::vector<std::size_t> offsets;
  for (std::size_t i = 0; i < s.size(); ++i) {
    if ((static_cast<unsigned char>(s[i]) & 0xC0) != 0x80) offsets.push_back(i);
  }
  offsets.push_back(s.size());
  return offsets;
}

using Val = LogicValue;

struct Scope {
  const Json* data;
  bool top;  // the evaluation context itself, where $flagd.* is visible
};

class Compiler {
 public:
  Compiler(LogicCompileSession::State& session, std::vector<LogicError>* warnings)
      : session_(session), warnings_(warnings) {}

  LogicNode compile(const Json& j, const std::string& ptr, int depth) {
    if (depth > kMaxExpressionDepth) {
      throw LogicError{
          ptr, "expression nested deeper than " + std::to_string(kMaxExpressionDepth) + " levels"};
    }
    if (j.is_object() && j.size() == 1 && j.begin().key() == "$ref") {
      return compile_ref(j.begin().value(), ptr, depth);
    }
    count(ptr);
    LogicNode node;
    node.pointer = ptr;
    if (j.is_array()) {
      node.op = Op::kArray;
      node.args.reserve(j.size());
      node.constant = true;
      for (std::size_t i = 0; i < j.size(); ++i) {
        node.args.push_back(compile(j[i], ptr + "/" + std::to_string(i), depth + 1));
        node.constant = node.constant && node.args.back().op == Op::kLiteral;
      }
      // A list of literals (say, emails to match with "in") is looked at, never copied, when
      // evaluated. Arrays of arrays are not folded, so no literal is stored more than twice.
      if (node.constant) node.literal = j;
      finish(node);
      return node;
    }
    if (!j.is_object() || j.size() != 1) {
      node.literal = j;  // scalars, and objects that are data rather than an operation
      return node;
    }
    const auto first = j.begin();
    const std::string& name = first.key();
    const Json& value = first.value();
    const std::string op_ptr = pointer_append(ptr, name);
    const auto it = operators().find(name);
    if (it == operators().end()) throw LogicError{ptr, "unknown operator \"" + name + "\""};
    node.op = it->second;
    if (value.is_array()) {
      node.args.reserve(value.size());
      for (std::size_t i = 0; i < value.size(); ++i) {
        node.args.push_back(compile(value[i], op_ptr + "/" + std::to_string(i), depth + 1));
      }
    } else {
      node.args.push_back(compile(value, op_ptr, depth + 1));
    }
    check(node, name);
    finish(node);
    return node;
  }

 private:
  void count(const std::string& ptr) {
    if (++session_.nodes > session_.max_nodes) {
      throw LogicError{ptr, "rules too large: more than " + std::to_string(session_.max_nodes) +
                                " compiled nodes (flags/budgets.h)"};
    }
  }

  static void finish(LogicNode& node) {
    for (const auto& a : node.args) node.height = std::max(node.height, a.height + 1);
  }

  // A $ref compiles its evaluator once (relative to "/$evaluators/name", where its nodes then
  // point) and shares it; errors and warnings inside it are reported at the $ref, as if inlined.
  LogicNode compile_ref(const Json& value, const std::string& ptr, int depth) {
    if (!value.is_string()) throw LogicError{ptr, "$ref must name an evaluator (a string)"};
    const std::string& ref = value.get_ref<const std::string&>();
    const Json* evaluators = session_.evaluators;
    if (evaluators == nullptr || !evaluators->is_object() || !evaluators->contains(ref)) {
      throw LogicError{ptr, "$ref to missing evaluator \"" + ref + "\""};
    }
    for (const auto& active : session_.active) {
      if (active == ref) throw LogicError{ptr, "$ref cycle through evaluator \"" + ref + "\""};
    }
    auto it = session_.compiled.find(ref);
    if (it == session_.compiled.end()) {
      const std::string base = pointer_append("/$evaluators", ref);
      const std::size_t first_warning = warnings_ != nullptr ? warnings_->size() : 0;
      LogicCompileSession::State::Compiled compiled;
      session_.active.push_back(ref);
      try {
        compiled.node = std::make_shared<const LogicNode>(compile((*evaluators)[ref], base, 0));
      } catch (LogicError& e) {
        // Every error inside points under base. One that a cycle caused stays true at any
        // later $ref too: the evaluator is on the cycle.
        e.pointer.erase(0, std::min(base.size(), e.pointer.size()));
        compiled.error = std::move(e);
      }
      session_.active.pop_back();
      if (warnings_ != nullptr) {
        for (std::size_t i = first_warning; i < warnings_->size(); ++i) {
          std::string& wp = (*warnings_)[i].pointer;
          wp = ptr + wp.substr(std::min(base.size(), wp.size()));
        }
      }
      it = session_.compiled.emplace(ref, std::move(compiled)).first;
    }
    const auto& compiled = it->second;
    if (compiled.error) throw LogicError{ptr + compiled.error->pointer, compiled.error->message};
    // Inlined, the evaluator would start one level below the $ref.
    if (depth + 1 + compiled.node->height > kMaxExpressionDepth) {
      throw LogicError{ptr, "expression nested deeper than " +
                                std::to_string(kMaxExpressionDepth) + " levels (through $ref \"" +
                                ref + "\")"};
    }
    count(ptr);
    LogicNode node;
    node.op = Op::kRef;
    node.pointer = ptr;
    node.ref = compiled.node;
    node.height = compiled.node->height + 1;
    return node;
  }

  void warn(const LogicNode& node, std::string message) {
    if (warnings_ != nullptr) warnings_->push_back({node.pointer, std::move(message)});
  }

  void check(LogicNode& node, const std::string& name) {
    switch (node.op) {
      case Op::kVar:
        if (!node.args.empty() && node.args[0].op == Op::kLiteral) {
          const Json& p = node.args[0].literal;
          if (p.is_string()) {
            split_path(p.get_ref<const std::string&>(), node.path);
            node.literal_path = true;
          } else if (p.is_number()) {
            split_path(to_js_string(p), node.path);
            node.literal_path = true;
          } else if (p.is_null()) {
            node.literal_path = true;  // the whole data
          }
        }
        if (node.args.empty()) node.literal_path = true;
        break;
      case Op::kFractional:
        check_fractional(node);
        break;
      case Op::kSemVer:
        if (node.args.size() != 3) warn(node, "sem_ver takes 3 arguments; it yields null");
        break;
      case Op::kStartsWith:
      case Op::kEndsWith:
        if (node.args.size() != 2) warn(node, name + " takes 2 arguments; it yields null");
        break;
      default:
        break;
    }
  }

  void check_fractional(const LogicNode& node) {
    const std::size_t first = !node.args.empty() && node.args[0].op != Op::kArray ? 1 : 0;
    if (node.args.size() <= first) {
      throw LogicError{node.pointer, "fractional needs at least one [variant, weight] bucket"};
    }
    bool all_literal = true;
    double total = 0;
    for (std::size_t i = first; i < node.args.size(); ++i) {
      const LogicNode& b = node.args[i];
      if (b.op != Op::kArray || b.args.empty() || b.args.size() > 2) {
        throw LogicError{b.pointer, "a fractional bucket must be [variant] or [variant, weight]"};
      }
      if (b.args.size() == 2) {
        const LogicNode& w = b.args[1];
        if (w.op != Op::kLiteral) {
          all_literal = false;
        } else if (!w.literal.is_number()) {
          throw LogicError{w.pointer, "a fractional weight must be a number"};
        } else if (w.literal.get<double>() < 0) {
          warn(w, "negative fractional weight counts as 0");
        } else {
          total += w.literal.get<double>();
        }
      } else {
        total += 1;
      }
    }
    if (all_literal && total < 1) {
      warn(node, "fractional weights sum to 0: every evaluation yields null (the default variant)");
    }
  }

  LogicCompileSession::State& session_;
  std::vector<LogicError>* warnings_;
};

// Thrown when an evaluation runs past a budget; Logic::evaluate turns it into an error.
struct OverBudget {
  std::string message;
};

// The values in v, strings counting one more per 64 bytes; counts no further than limit + 1, so
// measuring costs no more than the budget it is measured against.
std::uint64_t size_of(const Json& v, std::uint64_t limit) {
  std::uint64_t n = 0;
  std::vector<const Json*> todo{&v};
  while (!todo.empty() && n <= limit) {
    const Json* j = todo.back();
    todo.pop_back();
    ++n;
    if (j->is_string()) {
      n += j->get_ref<const std::string&>().size() / 64;
    } else if (j->is_structured()) {
      for (const auto& c : *j) {
        if (n + todo.size() > limit) break;
        todo.push_back(&c);
      }
    }
  }
  return n;
}

class Evaluator {
 public:
  explicit Evaluator(const LogicEnv& env) : env_(env) {}

  Val eval(const LogicNode& n, const Scope& s) {
    step(n, 1);
    switch (n.op) {
      case Op::kLiteral:
        return Val::ref(n.literal);
      case Op::kRef:
        return eval(*n.ref, s);
      case Op::kArray: {
        if (n.constant) return Val::ref(n.literal);
        Json out = Json::array();
        for (const auto& a : n.args) {
          Json v = own(eval(a, s), a);
          build(n, 1);
          out.push_back(std::move(v));
        }
        return out;
      }
      case Op::kVar:
        return var(n, s);
      case Op::kMissing:
        return missing(n, s);
      case Op::kMissingSome:
        return missing_some(n, s);
      case Op::kIf:
        return if_(n, s);
      case Op::kEq:
        return binary(n, s, [](const Json& a, const Json& b) { return loose_eq(a, b); });
      case Op::kNe:
        return binary(n, s, [](const Json& a, const Json& b) { return !loose_eq(a, b); });
      case Op::kStrictEq:
        return binary(n, s, [](const Json& a, const Json& b) { return strict_eq(a, b); });
      case Op::kStrictNe:
        return binary(n, s, [](const Json& a, const Json& b) { return !strict_eq(a, b); });
      case Op::kLt:
        return compare(n, s, false);
      case Op::kLe:
        return compare(n, s, true);
      case Op::kGt:
        return binary(n, s, [](const Json& a, const Json& b) { return js_less(b, a, false); });
      case Op::kGe:
        return binary(n, s, [](const Json& a, const Json& b) { return js_less(b, a, true); });
      case Op::kNot:
        return Json(!truthy(arg(n, 0, s).get()));
      case Op::kNotNot:
        return Json(truthy(arg(n, 0, s).get()));
      case Op::kAnd:
      case Op::kOr: {
        Val current;
        for (const auto& a : n.args) {
          current = eval(a, s);
          if (truthy(current.get()) == (n.op == Op::kOr)) return current;
        }
        return current;
      }
      case Op::kIn:
        return in(n, s);
      case Op::kCat: {
        std::string out;
        for (const auto& a : n.args) {
          const Val v = eval(a, s);
          scan(a, v.get());
          const std::string piece = to_js_string(v.get());
          build(n, 1 + piece.size() / 64);
          out += piece;
        }
        return Json(std::move(out));
      }
      case Op::kSubstr:
        return substr(n, s);
      case Op::kAdd: {
        double sum = 0;
        for (const auto& a : n.args) sum += parse_float(scanned(a, eval(a, s)).get());
        return number_json(sum);
      }
      case Op::kMul: {
        if (n.args.empty()) return Json(nullptr);
        double product = 1;
        for (const auto& a : n.args) product *= parse_float(scanned(a, eval(a, s)).get());
        return number_json(product);
      }
      case Op::kSub: {
        const double a = to_number(scanned_arg(n, 0, s).get());
        if (n.args.size() < 2) return number_json(-a);
        return number_json(a - to_number(scanned_arg(n, 1, s).get()));
      }
      case Op::kDiv: {
        const double a = to_number(scanned_arg(n, 0, s).get());
        return number_json(a / to_number(scanned_arg(n, 1, s).get()));
      }
      case Op::kMod: {
        const double a = to_number(scanned_arg(n, 0, s).get());
        return number_json(std::fmod(a, to_number(scanned_arg(n, 1, s).get())));
      }
      case Op::kMin:
      case Op::kMax: {
        if (n.args.empty()) return Json(nullptr);
        double best = n.op == Op::kMin ? std::numeric_limits<double>::infinity()
                                       : -std::numeric_limits<double>::infinity();
        for (const auto& a : n.args) {
          const double v = to_number(scanned(a, eval(a, s)).get());
          if (std::isnan(v)) return Json(nullptr);
          best = n.op == Op::kMin ? std::min(best, v) : std::max(best, v);
        }
        return number_json(best);
      }
      case Op::kMerge: {
        Json out = Json::array();
        for (const auto& a : n.args) {
          Json v = own(eval(a, s), a);
          if (v.is_array()) {
            for (auto& e : v) {
              build(n, 1);
              out.push_back(std::move(e));
            }
          } else {
            build(n, 1);
            out.push_back(std::move(v));
          }
        }
        return out;
      }
      case Op::kSome:
      case Op::kAll:
      case Op::kNone:
      case Op::kFilter:
      case Op::kMap:
        return iterate(n, s);
      case Op::kReduce:
        return reduce(n, s);
      case Op::kFractional:
        return fractional(n, s);
      case Op::kSemVer:
        return sem_ver(n, s);
      case Op::kStartsWith:
      case Op::kEndsWith:
        return affix(n, s);
    }
    return Json(nullptr);
  }

 private:
  // ---- budgets (flags/budgets.h) ----
  [[noreturn]] static void over_budget(const LogicNode& at, const std::string& what) {
    throw OverBudget{"targeting exceeded its evaluation budget (" + what + ") at " +
                     (at.pointer.empty() ? std::string("/") : at.pointer)};
  }
  // Work: one unit per operation, plus what an operation scans.
  void step(const LogicNode& at, std::uint64_t units) {
    steps_ += units;
    if (steps_ > kMaxEvaluationSteps) {
      over_budget(at, "more than " + std::to_string(kMaxEvaluationSteps) + " steps");
    }
  }
  // Memory: each value built or copied.
  void build(const LogicNode& at, std::uint64_t values) {
    values_ += values;
    if (values_ > kMaxEvaluationValues) {
      over_budget(at, "more than " + std::to_string(kMaxEvaluationValues) + " values built");
    }
  }
  // Charges the work of reading all of v (turning an array into text, comparing strings).
  void scan(const LogicNode& at, const Json& v) {
    if (v.is_string()) {
      step(at, v.get_ref<const std::string&>().size() / 64);
    } else if (v.is_structured()) {
      step(at, size_of(v, kMaxEvaluationSteps - steps_));
    }
  }
  Val scanned(const LogicNode& at, Val v) {
    scan(at, v.get());
    return v;
  }
  Val scanned_arg(const LogicNode& n, std::size_t i, const Scope& s) {
    if (i >= n.args.size()) return Val();
    return scanned(n.args[i], eval(n.args[i], s));
  }
  // A copy of v, charged before it is made.
  Json copy(const LogicNode& at, const Json& v) {
    build(at, size_of(v, kMaxEvaluationValues - values_));
    return v;
  }
  // v as an owned value: borrowed ones are copied (and charged), owned ones were charged when
  // they were built.
  Json own(Val v, const LogicNode& at) {
    if (v.borrowed()) return copy(at, v.get());
    return std::move(v).take();
  }

  Val arg(const LogicNode& n, std::size_t i, const Scope& s) {
    if (i >= n.args.size()) return Val();
    return eval(n.args[i], s);
  }

  template <typename F>
  Val binary(const LogicNode& n, const Scope& s, F f) {
    const Val a = scanned_arg(n, 0, s);
    const Val b = scanned_arg(n, 1, s);
    return Json(f(a.get(), b.get()));
  }

  Val compare(const LogicNode& n, const Scope& s, bool or_equal) {
    const Val a = scanned_arg(n, 0, s);
    const Val b = scanned_arg(n, 1, s);
    if (n.args.size() >= 3) {  // between: a < b < c
      const Val c = scanned_arg(n, 2, s);
      return Json(js_less(a.get(), b.get(), or_equal) && js_less(b.get(), c.get(), or_equal));
    }
    return Json(js_less(a.get(), b.get(), or_equal));
  }

  // Trace steps copy values (sem_ver's arguments, fractional's result): they count as built.
  void trace(const LogicNode& at, Json entry) {
    if (env_.trace == nullptr) return;
    build(at, size_of(entry, kMaxEvaluationValues - values_));
    env_.trace->push_back(std::move(entry));
  }

  const Json& flagd_properties() {
    if (!flagd_built_) {
      flagd_ = Json::object();
      flagd_["flagKey"] = std::string(env_.flag_key);
      flagd_["timestamp"] = env_.timestamp
                                ? *env_.timestamp
                                : std::chrono::duration_cast<std::chrono::seconds>(
                                      std::chrono::system_clock::now().time_since_epoch())
                                      .count();
      flagd_built_ = true;
    }
    return flagd_;
  }

  // Follows path from the scope's data; nullptr when something on the way is missing.
  template <typename Path>
  const Json* lookup(const Scope& s, const Path& path) {
    const Json* cur = s.data;
    std::size_t i = 0;
    via_flagd_ = false;
    if (s.top && !path.empty() && path[0] == "$flagd") {
      cur = &flagd_properties();
      via_flagd_ = true;
      i = 1;
    }
    for (; i < path.size(); ++i) {
      const std::string_view seg = path[i];
      if (cur->is_object()) {
        const auto it = cur->find(seg);
        if (it == cur->end()) return nullptr;
        cur = &*it;
      } else if (cur->is_array()) {
        std::size_t index = 0;
        if (seg.empty()) return nullptr;
        for (char c : seg) {
          if (c < '0' || c > '9') return nullptr;
          index = index * 10 + static_cast<std::size_t>(c - '0');
          if (index > cur->size()) return nullptr;
        }
        if (index >= cur->size()) return nullptr;
        cur = &(*cur)[index];
      } else {
        return nullptr;
      }
    }
    return cur;
  }

  const Json* lookup_key(const Scope& s, const Json& key) {
    if (key.is_null()) return s.data;
    const std::string text = key.is_string() ? key.get<std::string>() : to_js_string(key);
    if (text.empty()) return s.data;
    std::vector<std::string_view> path;
    split_path(std::string_view(text), path);
    return lookup(s, path);
  }

  Val var(const LogicNode& n, const Scope& s) {
    const Json* found = nullptr;
    if (n.literal_path) {
      via_flagd_ = false;
      found = n.path.empty() ? s.data : lookup(s, n.path);
    } else {
      const Val key = scanned(n.args[0], eval(n.args[0], s));
      via_flagd_ = false;
      found = lookup_key(s, key.get());
    }
    // $flagd.* lives in this evaluator, which the result may outlive: copy it.
    if (found != nullptr) return via_flagd_ ? Val(Json(*found)) : Val::ref(*found);
    if (n.args.size() >= 2) return eval(n.args[1], s);
    return Val();
  }

  Json missing_keys(const LogicNode& n, const Json& keys, const Scope& s) {
    Json out = Json::array();
    for (const auto& k : keys) {
      step(n, 1);
      scan(n, k);
      const Json* v = lookup_key(s, k);
      if (v == nullptr || v->is_null() ||
          (v->is_string() && v->get_ref<const std::string&>().empty())) {
        out.push_back(copy(n, k));
      }
    }
    return out;
  }

  Val missing(const LogicNode& n, const Scope& s) {
    Json keys = Json::array();
    for (std::size_t i = 0; i < n.args.size(); ++i) {
      Json v = own(eval(n.args[i], s), n.args[i]);
      if (i == 0 && v.is_array()) {
        keys = std::move(v);
        break;
      }
      build(n, 1);
      keys.push_back(std::move(v));
    }
    return missing_keys(n, keys, s);
  }

  Val missing_some(const LogicNode& n, const Scope& s) {
    const double need = to_number(arg(n, 0, s).get());
    const Val options = arg(n, 1, s);
    if (!options.get().is_array()) return Json::array();
    Json absent = missing_keys(n, options.get(), s);
    if (static_cast<double>(options.get().size() - absent.size()) >= need) return Json::array();
    return absent;
  }

  Val if_(const LogicNode& n, const Scope& s) {
    std::size_t i = 0;
    for (; i + 1 < n.args.size(); i += 2) {
      if (truthy(eval(n.args[i], s).get())) {
        if (env_.trace != nullptr) {
          trace(n, {{"op", "if"}, {"at", n.pointer}, {"matched", n.args[i].pointer}});
        }
        return eval(n.args[i + 1], s);
      }
    }
    if (i < n.args.size()) {
      if (env_.trace != nullptr) trace(n, {{"op", "if"}, {"at", n.pointer}, {"matched", "else"}});
      return eval(n.args[i], s);
    }
    if (env_.trace != nullptr) trace(n, {{"op", "if"}, {"at", n.pointer}, {"matched", nullptr}});
    return Val();
  }

  Val in(const LogicNode& n, const Scope& s) {
    const Val needle = arg(n, 0, s);
    const Val hay = arg(n, 1, s);
    const Json& h = hay.get();
    if (h.is_string()) {
      scan(n, needle.get());
      // Naive substring search: up to (haystack x needle) byte comparisons.
      const std::uint64_t hs = h.get_ref<const std::string&>().size();
      const std::uint64_t ns = needle.get().is_string()
                                   ? needle.get().get_ref<const std::string&>().size()
                                   : size_of(needle.get(), kMaxEvaluationSteps);
      step(n, 1 + hs / 64 + hs * std::min(hs, ns) / 4096);
      return Json(h.get_ref<const std::string&>().find(to_js_string(needle.get())) !=
                  std::string::npos);
    }
    if (h.is_array()) {
      const Json& x = needle.get();
      step(n, h.size() * (1 + (x.is_string() ? x.get_ref<const std::string&>().size() / 64 : 0)));
      for (const auto& e : h) {
        if (strict_eq(e, needle.get())) return Json(true);
      }
    }
    return Json(false);
  }

  Val substr(const LogicNode& n, const Scope& s) {
    const std::string str = to_js_string(scanned_arg(n, 0, s).get());
    step(n, str.size() / 64);
    build(n, 1 + str.size() / 64);
    const auto cps = code_points(str);
    const auto len = static_cast<long long>(cps.size() - 1);
    const double start_d = n.args.size() > 1 ? to_number(arg(n, 1, s).get()) : 0;
    long long start = std::isnan(start_d) ? 0 : static_cast<long long>(start_d);
    if (start < 0) start = std::max(0LL, len + start);
    start = std::min(start, len);
    long long end = len;
    if (n.args.size() > 2) {
      const double count_d = to_number(arg(n, 2, s).get());
      const long long count = std::isnan(count_d) ? 0 : static_cast<long long>(count_d);
      end = count < 0 ? std::max(start, len + count) : std::min(len, start + count);
    }
    return Json(
        str.substr(cps[static_cast<std::size_t>(start)],
                   cps[static_cast<std::size_t>(end)] - cps[static_cast<std::size_t>(start)]));
  }

  Val iterate(const LogicNode& n, const Scope& s) {
    const Val items = arg(n, 0, s);
    const Json& list = items.get();
    const bool is_list = list.is_array();
    switch (n.op) {
      case Op::kAll: {
        if (!is_list || list.empty() || n.args.size() < 2) return Json(false);
        for (const auto& e : list) {
          if (!truthy(eval(n.args[1], Scope{&e, false}).get())) return Json(false);
        }
        return Json(true);
      }
      case Op::kSome:
      case Op::kNone: {
        bool any = false;
        if (is_list && n.args.size() >= 2) {
          for (const auto& e : list) {
            if (truthy(eval(n.args[1], Scope{&e, false}).get())) {
              any = true;
              break;
            }
          }
        }
        return Json(n.op == Op::kSome ? any : !any);
      }
      case Op::kFilter: {
        Json out = Json::array();
        if (!is_list || n.args.size() < 2) return out;
        for (const auto& e : list) {
          if (truthy(eval(n.args[1], Scope{&e, false}).get())) out.push_back(copy(n, e));
        }
        return out;
      }
      default: {  // map
        Json out = Json::array();
        if (!is_list || n.args.size() < 2) return out;
        for (const auto& e : list) {
          Json v = own(eval(n.args[1], Scope{&e, false}), n.args[1]);
          build(n, 1);
          out.push_back(std::move(v));
        }
        return out;
      }
    }
  }

  Val reduce(const LogicNode& n, const Scope& s) {
    const Val items = arg(n, 0, s);
    Json acc = n.args.size() > 2 ? own(eval(n.args[2], s), n.args[2]) : Json();
    if (!items.get().is_array() || n.args.size() < 2) return acc;
    for (const auto& e : items.get()) {
      build(n, 1);
      const Json data = {{"current", copy(n, e)}, {"accumulator", std::move(acc)}};
      acc = own(eval(n.args[1], Scope{&data, false}), n.args[1]);
    }
    return acc;
  }

  Val fractional(const LogicNode& n, const Scope& s) {
    std::size_t first = 0;
    std::string_view bucketing;
    Val explicit_value;
    char stack_buf[256];
    std::string heap_buf;
    if (!n.args.empty() && n.args[0].op != Op::kArray) {
      explicit_value = eval(n.args[0], s);
      const Val& v = explicit_value;
      if (!v.get().is_string()) {
        if (env_.trace != nullptr) {
          trace(n, {{"op", "fractional"},
                 {"at", n.pointer},
                 {"result", nullptr},
                 {"why", "the bucketing value is not a string"}});
        }
        return Val();
      }
      bucketing = v.get().get_ref<const std::string&>();
      first = 1;
    } else {
      const Json& ctx = *env_.context;
      const auto tk = ctx.is_object() ? ctx.find("targetingKey") : ctx.end();
      if (tk == ctx.end() || !tk->is_string() || tk->get_ref<const std::string&>().empty()) {
        if (env_.trace != nullptr) {
          trace(n, {{"op", "fractional"},
                 {"at", n.pointer},
                 {"result", nullptr},
                 {"why", "no targetingKey (string) in the context"}});
        }
        return Val();
      }
      const std::string& key = tk->get_ref<const std::string&>();
      const std::size_t len = env_.flag_key.size() + key.size();
      char* buf = stack_buf;
      if (len > sizeof(stack_buf)) {
        heap_buf.resize(len);
        buf = heap_buf.data();
      }
      std::memcpy(buf, env_.flag_key.data(), env_.flag_key.size());
      std::memcpy(buf + env_.flag_key.size(), key.data(), key.size());
      bucketing = std::string_view(buf, len);
    }

    // Weights: negative or non-numeric ones count as 0; fractions are truncated.
    std::uint64_t weights_inline[8];
    std::vector<std::uint64_t> weights_heap;
    const std::size_t count = n.args.size() - first;
    std::uint64_t* weights = weights_inline;
    if (count > 8) {
      weights_heap.resize(count);
      weights = weights_heap.data();
    }
    std::uint64_t total = 0;
    for (std::size_t i = 0; i < count; ++i) {
      const LogicNode& bucket = n.args[first + i];
      std::uint64_t w = 1;
      if (bucket.args.size() >= 2) {
        const double d = to_number(eval(bucket.args[1], s).get());
        w = std::isnan(d) || d <= 0 ? 0
            : d >= 4294967295.0     ? 4294967295ULL
                                    : static_cast<std::uint64_t>(d);
      }
      weights[i] = w;
      total += w;
    }
    if (total == 0) {
      if (env_.trace != nullptr) {
        trace(n, {{"op", "fractional"},
               {"at", n.pointer},
               {"bucketingValue", bucketing},
               {"result", nullptr},
               {"why", "the weights sum to 0"}});
      }
      return Val();
    }
    step(n, bucketing.size() / 64);
    const std::uint32_t hash = murmur3_x86_32(bucketing);
    const std::uint64_t bucket = bucket_of(hash, total);
    std::uint64_t running = 0;
    for (std::size_t i = 0; i < count; ++i) {
      running += weights[i];
      if (running > bucket) {
        Val chosen = eval(n.args[first + i].args[0], s);
        if (env_.trace != nullptr) {
          trace(n, {{"op", "fractional"},
                 {"at", n.pointer},
                 {"bucketingValue", bucketing},
                 {"hash", hash},
                 {"totalWeight", total},
                 {"bucket", bucket},
                 {"bucketIndex", i},
                 {"result", chosen.get()}});
        }
        return chosen;
      }
    }
    return Val();  // unreachable: bucket < total
  }

  // A sem_ver argument as text: strings as they are, numbers as flagd prints them ("1", "1.2").
  static std::optional<std::string> version_text(const Json& v) {
    if (v.is_string()) return v.get<std::string>();
    if (v.is_number()) return to_js_string(v);
    return std::nullopt;
  }

  Val sem_ver(const LogicNode& n, const Scope& s) {
    if (n.args.size() != 3) return Val();
    const Val a = scanned_arg(n, 0, s);
    const Val op = scanned_arg(n, 1, s);
    const Val b = scanned_arg(n, 2, s);
    const auto left = version_text(a.get());
    const auto right = version_text(b.get());
    std::optional<bool> r;
    if (left && right && op.get().is_string()) {
      r = semver_matches(*left, op.get().get_ref<const std::string&>(), *right);
    }
    if (env_.trace != nullptr) {
      trace(n, {{"op", "sem_ver"},
             {"at", n.pointer},
             {"args", Json::array({a.get(), op.get(), b.get()})},
             {"result", r ? Json(*r) : Json(nullptr)}});
    }
    if (!r) return Val();
    return Json(*r);
  }

  Val affix(const LogicNode& n, const Scope& s) {
    if (n.args.size() != 2) return Val();
    const Val a = arg(n, 0, s);
    const Val b = arg(n, 1, s);
    if (!a.get().is_string() || !b.get().is_string()) return Val();
    scan(n, b.get());
    const std::string_view str = a.get().get_ref<const std::string&>();
    const std::string_view fix = b.get().get_ref<const std::string&>();
    if (fix.size() > str.size()) return Json(false);
    return Json(n.op == Op::kStartsWith ? str.substr(0, fix.size()) == fix
                                        : str.substr(str.size() - fix.size()) == fix);
  }

  const LogicEnv& env_;
  std::uint64_t steps_ = 0;   // <= kMaxEvaluationSteps
  std::uint64_t values_ = 0;  // <= kMaxEvaluationValues
  Json flagd_;
  bool flagd_built_ = false;
  bool via_flagd_ = false;  // the last lookup went through $flagd
};

}  // namespace

bool truthy(const Json& v) {
  switch (v.type()) {
    case Json::value_t::null:
      return false;
    case Json::value_t::boolean:
      return v.get<bool>();
    case Json::value_t::number_integer:
      return v.get<std::int64_t>() != 0;
    case Json::value_t::number_unsigned:
      return v.get<std::uint64_t>() != 0;
    case Json::value_t::number_float: {
      const double d = v.get<double>();
      return d != 0 && !std::isnan(d);
    }
    case Json::value_t::string:
      return !v.get_ref<const std::string&>().empty();
    case Json::value_t::array:
      return !v.empty();
    default:
      return true;
  }
}

std::optional<Logic> Logic::compile(const Json& rule, const Json* evaluators, LogicError* error,
                                    std::vector<LogicError>* warnings) {
  LogicCompileSession session(evaluators);
  return compile(rule, session, error, warnings);
}

std::optional<Logic> Logic::compile(const Json& rule, LogicCompileSession& session,
                                    LogicError* error, std::vector<LogicError>* warnings) {
  Compiler compiler(*session.state_, warnings);
  try {
    Logic logic;
    logic.root_ = std::make_shared<const LogicNode>(compiler.compile(rule, "", 0));
    return logic;
  } catch (LogicError& e) {
    *error = std::move(e);
    return std::nullopt;
  }
}

LogicValue Logic::evaluate(const LogicEnv& env, std::string* error) const {
  try {
    Evaluator ev(env);
    return ev.eval(*root_, Scope{env.context, true});
  } catch (const OverBudget& e) {
    if (error != nullptr) *error = e.message + " (flags/budgets.h)";
    return LogicValue();
  } catch (const std::exception& e) {
    if (error != nullptr) *error = std::string("targeting evaluation failed: ") + e.what();
    return LogicValue();
  } catch (...) {
    if (error != nullptr) *error = "targeting evaluation failed";
    return LogicValue();
  }
}

}  // namespace memsnap::flags
