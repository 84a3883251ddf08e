#include "flags/flag_set.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <system_error>

namespace memsnap::flags {

const Json* Flag::variant(std::string_view name) const {
  for (const auto& [n, v] : variants) {
    if (n == name) return &v;
  }
  return nullptr;
}

const Flag* FlagSet::find(std::string_view key) const {
  const auto it = flags_.find(key);
  return it == flags_.end() ? nullptr : &it->second;
}

std::vector<std::string> FlagSet::keys() const {
  std::vector<std::string> out;
  out.reserve(flags_.size());
  for (const auto& [k, f] : flags_) out.push_back(k);
  std::sort(out.begin(), out.end());
  return out;
}

namespace {

using Severity = Diagnostic::Severity;

std::string describe(const Json& v) {
  switch (v.type()) {
    case Json::value_t::null:
      return "null";
    case Json::value_t::boolean:
      return "a boolean";
    case Json::value_t::number_integer:
    case Json::value_t::number_unsigned:
      return "an integer";
    case Json::value_t::number_float:
      return "a float";
    case Json::value_t::string:
      return "a string";
    case Json::value_t::array:
      return "an array";
    default:
      return "an object";
  }
}

// The value as the requested type, or nullopt when it is not of that type.
std::optional<Json> as_type(const Json& v, FlagType type) {
  switch (type) {
    case FlagType::kBoolean:
      if (v.is_boolean()) return v;
      break;
    case FlagType::kString:
      if (v.is_string()) return v;
      break;
    case FlagType::kInteger:
      if (v.is_number_integer()) return v;
      if (v.is_number_float()) {
        const double d = v.get<double>();
        if (d == std::floor(d) && std::fabs(d) < 9.2e18) return Json(static_cast<std::int64_t>(d));
      }
      break;
    case FlagType::kFloat:
      if (v.is_number()) return Json(v.get<double>());
      break;
    case FlagType::kObject:
      if (v.is_object()) return v;
      break;
  }
  return std::nullopt;
}

std::string variant_name_of(const Json& result) {
  if (result.is_string()) return result.get<std::string>();
  if (result.is_boolean()) return result.get<bool>() ? "true" : "false";
  if (result.is_number_integer()) return result.dump();
  if (result.is_number_float()) {
    const double d = result.get<double>();
    if (d == std::floor(d) && std::fabs(d) < 1e15) return std::to_string(static_cast<long long>(d));
    return result.dump();
  }
  return {};
}

// At most 200 bytes of text for an error message (a result may be megabytes), cut between UTF-8
// code points so the message stays valid JSON text.
std::string excerpt(std::string text) {
  constexpr std::size_t kMax = 200;
  if (text.size() <= kMax) return text;
  std::size_t cut = kMax;
  while (cut > 0 && (static_cast<unsigned char>(text[cut]) & 0xC0) == 0x80) --cut;
  text.resize(cut);
  return text + "...";
}

std::uint64_t fnv1a(std::uint64_t h, std::string_view data) {
  for (unsigned char c : data) {
    h ^= c;
    h *= 1099511628211ULL;
  }
  return h;
}

}  // namespace

class FlagSetBuilder {
 public:
  explicit FlagSetBuilder(const LoadOptions& options) : options_(options) {}

  LoadResult build(const std::vector<Document>& docs) {
    auto set = std::make_shared<FlagSet>();
    std::unordered_map<std::string, const Document*> seen;
    std::uint64_t hash = 1469598103934665603ULL;
    for (const Document& doc : docs) {
      set->files_.push_back(doc.file);
      hash = fnv1a(hash, doc.file);
      hash = fnv1a(hash, std::string_view(reinterpret_cast<const char*>(&doc.text_hash),
                                          sizeof(doc.text_hash)));
      add_document(doc, *set, seen);
    }
    set->content_hash_ = hash;
    LoadResult result;
    bool rejected = false;
    for (const auto& d : diags_) {
      if (d.severity == Severity::kError ||
          (options_.strict && d.severity == Severity::kFlagError)) {
        rejected = true;
      }
    }
    result.diagnostics = std::move(diags_);
    if (!rejected) result.flags = std::move(set);
    return result;
  }

 private:
  void error(const Document& doc, const std::string& ptr, std::string msg,
             Severity sev = Severity::kError) {
    diags_.push_back(doc.diagnostic(ptr, std::move(msg), sev));
  }

  bool check_metadata(const Document& doc, const Json& meta, const std::string& ptr, Severity sev) {
    if (!meta.is_object()) {
      error(doc, ptr, "metadata must be a map of names to strings, numbers or booleans", sev);
      return false;
    }
    for (const auto& [k, v] : meta.items()) {
      if (!v.is_string() && !v.is_number() && !v.is_boolean()) {
        error(doc, pointer_append(ptr, k),
              "metadata \"" + k + "\" must be a string, number or boolean, not " + describe(v),
              sev);
        return false;
      }
    }
    return true;
  }

  void add_document(const Document& doc, FlagSet& set,
                    std::unordered_map<std::string, const Document*>& seen) {
    const Json& root = doc.root;
    if (!root.is_object()) {
      error(doc, "", "a flag file must be a map with a \"flags\" key, not " + describe(root));
      return;
    }
    for (const auto& [k, v] : root.items()) {
      if (k != "flags" && k != "$evaluators" && k != "metadata" && k != "$schema") {
        error(doc, pointer_append("", k) + "#key", "unknown top-level key \"" + k + "\" (ignored)",
              Severity::kWarning);
      }
    }
    Json set_meta = Json::object();
    if (const auto m = root.find("metadata"); m != root.end()) {
      if (check_metadata(doc, *m, "/metadata", Severity::kError)) set_meta = *m;
    }
    const Json* evaluators = nullptr;
    if (const auto e = root.find("$evaluators"); e != root.end()) {
      if (!e->is_object()) {
        error(doc, "/$evaluators", "$evaluators must be a map of names to JsonLogic rules");
      } else {
        evaluators = &*e;
      }
    }
    const auto flags = root.find("flags");
    if (flags == root.end()) {
      error(doc, "", "no \"flags\" map");
      return;
    }
    if (!flags->is_object()) {
      error(doc, "/flags",
            "\"flags\" must be a map of flag keys to flags, not " + describe(*flags));
      return;
    }
    // Every flag of the file shares its compiled evaluators and one compiled-node budget.
    LogicCompileSession rules(evaluators);
    for (const auto& [key, def] : flags->items()) {
      const std::string ptr = pointer_append("/flags", key);
      if (const auto it = seen.find(key); it != seen.end()) {
        const Position p = it->second->position(ptr);
        error(doc, ptr + "#key",
              "flag \"" + key + "\" is also defined at " + it->second->file + ":" +
                  std::to_string(p.line) + ":" + std::to_string(p.col));
        continue;
      }
      seen.emplace(key, &doc);
      std::optional<Flag> flag = build_flag(doc, key, def, ptr, rules, set_meta);
      if (flag) set.flags_.emplace(key, std::move(*flag));
    }
  }

  std::optional<Flag> build_flag(const Document& doc, const std::string& key, const Json& def,
                                 const std::string& ptr, LogicCompileSession& rules,
                                 const Json& set_meta) {
    if (!def.is_object()) {
      error(doc, ptr, "flag \"" + key + "\" must be a map, not " + describe(def));
      return std::nullopt;
    }
    Flag flag;
    flag.key = key;
    flag.file = doc.file;
    Json metadata = set_meta;
    bool structural_ok = true;
    for (const auto& [k, v] : def.items()) {
      if (k != "state" && k != "variants" && k != "defaultVariant" && k != "targeting" &&
          k != "metadata") {
        error(doc, pointer_append(ptr, k) + "#key",
              "flag \"" + key + "\": unknown field \"" + k +
                  "\" (expected state, variants, defaultVariant, targeting, metadata)");
        structural_ok = false;
      }
    }
    // state
    const auto state = def.find("state");
    if (state == def.end()) {
      error(doc, ptr, "flag \"" + key + "\": missing \"state\" (ENABLED or DISABLED)");
      structural_ok = false;
    } else if (*state == "ENABLED" || *state == "DISABLED") {
      flag.enabled = *state == "ENABLED";
    } else {
      error(doc, ptr + "/state",
            "flag \"" + key + "\": state must be ENABLED or DISABLED, not " + state->dump());
      structural_ok = false;
    }
    // variants
    const auto variants = def.find("variants");
    if (variants == def.end() || !variants->is_object() || variants->empty()) {
      error(doc, variants == def.end() ? ptr : ptr + "/variants",
            "flag \"" + key + "\": \"variants\" must be a non-empty map of names to values");
      structural_ok = false;
    }
    if (!structural_ok) return std::nullopt;

    auto flag_error = [&](const std::string& at, std::string msg) {
      if (!flag.error) {
        flag.error = doc.diagnostic(at, "flag \"" + key + "\": " + msg, Severity::kFlagError);
        diags_.push_back(*flag.error);
      }
    };

    std::optional<FlagType> type;
    std::string first_variant;
    for (const auto& [name, value] : variants->items()) {
      flag.variants.emplace_back(name, value);
      const std::string vptr = pointer_append(ptr + "/variants", name);
      FlagType t;
      if (value.is_boolean()) {
        t = FlagType::kBoolean;
      } else if (value.is_string()) {
        t = FlagType::kString;
      } else if (value.is_number_integer()) {
        t = FlagType::kInteger;
      } else if (value.is_number_float()) {
        t = FlagType::kFloat;
      } else if (value.is_object()) {
        t = FlagType::kObject;
      } else {
        flag_error(vptr, "variant \"" + name + "\" is " + describe(value) +
                             "; variants are booleans, strings, numbers or objects");
        continue;
      }
      if (!type) {
        type = t;
        first_variant = name;
      } else if (*type != t) {
        const bool numbers = (*type == FlagType::kInteger || *type == FlagType::kFloat) &&
                             (t == FlagType::kInteger || t == FlagType::kFloat);
        if (numbers) {
          type = FlagType::kFloat;
        } else {
          flag_error(vptr, "variants of mixed types: \"" + first_variant + "\" is " +
                               std::string(type_name(*type)) + ", \"" + name + "\" is " +
                               std::string(type_name(t)));
        }
      }
    }
    flag.type = type.value_or(FlagType::kString);

    // defaultVariant
    if (const auto dv = def.find("defaultVariant"); dv != def.end() && !dv->is_null()) {
      if (!dv->is_string()) {
        flag_error(ptr + "/defaultVariant", "defaultVariant must be a variant name or null");
      } else if (flag.variant(dv->get_ref<const std::string&>()) == nullptr) {
        flag_error(ptr + "/defaultVariant",
                   "defaultVariant \"" + dv->get<std::string>() + "\" is not one of its variants");
      } else {
        flag.default_variant = dv->get<std::string>();
      }
    }

    // metadata
    if (const auto m = def.find("metadata"); m != def.end()) {
      if (check_metadata(doc, *m, ptr + "/metadata", Severity::kFlagError)) {
        for (const auto& [k, v] : m->items()) metadata[k] = v;
      } else if (!flag.error) {
        flag.error = diags_.back();
      }
    }

    flag.metadata = std::make_shared<const Json>(std::move(metadata));

    // targeting
    if (const auto t = def.find("targeting");
        t != def.end() && !t->is_null() && !(t->is_object() && t->empty())) {
      LogicError err;
      std::vector<LogicError> warnings;
      flag.targeting = Logic::compile(*t, rules, &err, &warnings);
      const std::string tptr = ptr + "/targeting";
      flag.targeting_position = doc.position(tptr);
      if (!flag.targeting) flag_error(tptr + err.pointer, "targeting: " + err.message);
      for (const auto& w : warnings) {
        error(doc, tptr + w.pointer, "flag \"" + key + "\": targeting: " + w.message,
              Severity::kWarning);
      }
    }
    return flag;
  }

  LoadOptions options_;
  std::vector<Diagnostic> diags_;
};

Resolution FlagSet::evaluate(std::string_view key, const Json& context,
                             std::optional<FlagType> type, const Json& default_value,
                             const EvalOptions& options) const {
  // Nothing escapes an evaluation: whatever fails is an ERROR with the caller's default.
  try {
    return evaluate_unguarded(key, context, type, default_value, options);
  } catch (const std::exception& e) {
    Resolution r;
    r.flag = std::string(key);
    r.value = default_value;
    r.reason = Reason::kError;
    r.error_code = ErrorCode::kGeneral;
    r.error_message = std::string("evaluation failed: ") + e.what();
    return r;
  }
}

Resolution FlagSet::evaluate_unguarded(std::string_view key, const Json& context,
                                       std::optional<FlagType> type, const Json& default_value,
                                       const EvalOptions& options) const {
  Resolution r;
  r.flag = std::string(key);
  if (options.explain) r.trace = Json::array();
  auto fail = [&](ErrorCode code, std::string message) {
    r.value = default_value;
    r.variant.reset();
    r.reason = Reason::kError;
    r.error_code = code;
    r.error_message = std::move(message);
    if (options.explain) {
      r.trace.push_back({{"op", "result"},
                         {"reason", "ERROR"},
                         {"errorCode", error_code_name(code)},
                         {"errorMessage", r.error_message}});
    }
    return r;
  };

  const Flag* flag = find(key);
  if (flag == nullptr) return fail(ErrorCode::kFlagNotFound, "flag \"" + r.flag + "\" not found");
  r.metadata_ptr = flag->metadata;
  if (options.explain) r.trace.push_back({{"op", "flag"}, {"file", flag->file}});
  if (!flag->enabled) {
    r.value = default_value;
    r.reason = Reason::kDisabled;
    if (options.explain) r.trace.push_back({{"op", "result"}, {"reason", "DISABLED"}});
    return r;
  }
  if (flag->error) return fail(ErrorCode::kParseError, flag->error->to_string());

  std::optional<std::string> variant;
  Reason reason = Reason::kStatic;
  if (flag->targeting) {
    static const Json kEmptyContext = Json::object();
    LogicEnv env;
    env.context = context.is_object() ? &context : &kEmptyContext;
    env.flag_key = key;
    env.timestamp = options.timestamp;
    env.trace = options.explain ? &r.trace : nullptr;
    std::string err;
    const LogicValue value = flag->targeting->evaluate(env, &err);
    const Json& result = value.get();
    if (!err.empty()) return fail(ErrorCode::kGeneral, err);
    if (result.is_null()) {
      variant = flag->default_variant;
      reason = Reason::kDefault;
    } else {
      std::string converted;
      if (!result.is_string()) {
        converted = variant_name_of(result);
        if (converted.empty()) {
          return fail(ErrorCode::kGeneral, "targeting returned " + describe(result) +
                                               ", not a variant name: " + excerpt(result.dump()));
        }
      }
      const std::string& name =
          result.is_string() ? result.get_ref<const std::string&>() : converted;
      if (flag->variant(name) == nullptr) {
        return fail(ErrorCode::kGeneral,
                    "targeting returned \"" + excerpt(name) + "\", which is not a variant of the flag");
      }
      variant = name;
      reason = Reason::kTargetingMatch;
    }
  } else {
    variant = flag->default_variant;
    reason = variant ? Reason::kStatic : Reason::kDefault;
  }

  if (!variant) {
    r.value = default_value;
    r.reason = Reason::kDefault;
  } else {
    const Json& value = *flag->variant(*variant);
    if (type) {
      std::optional<Json> typed = as_type(value, *type);
      if (!typed) {
        return fail(ErrorCode::kTypeMismatch,
                    "flag \"" + r.flag + "\" is a " + std::string(type_name(flag->type)) +
                        " flag; asked for " + std::string(type_name(*type)));
      }
      r.value = std::move(*typed);
    } else {
      r.value = value;
    }
    r.variant = std::move(variant);
    r.reason = reason;
  }
  if (options.explain) {
    r.trace.push_back({{"op", "result"},
                       {"variant", r.variant ? Json(*r.variant) : Json(nullptr)},
                       {"reason", reason_name(r.reason)}});
  }
  return r;
}

std::vector<Diagnostic> check_evaluation_budgets(const FlagSet& set) {
  std::vector<Diagnostic> found;
  EvalOptions options;
  options.timestamp = 0;
  for (const std::string& key : set.keys()) {
    const Flag* flag = set.find(key);
    if (flag == nullptr || !flag->targeting || flag->error) continue;
    const Resolution r = set.evaluate(key, Json::object(), std::nullopt, nullptr, options);
    if (r.error_code != ErrorCode::kGeneral ||
        r.error_message.find("evaluation budget") == std::string::npos) {
      continue;
    }
    found.push_back({Severity::kFlagError, flag->file, flag->targeting_position.line,
                     flag->targeting_position.col,
                     "flag \"" + key + "\": targeting: " + r.error_message});
  }
  return found;
}

std::string LoadResult::error_text() const {
  std::string out;
  for (const auto& d : diagnostics) {
    if (d.severity == Severity::kWarning) continue;
    if (!out.empty()) out += '\n';
    out += d.to_string();
  }
  return out;
}

LoadResult build_flag_set(const std::vector<Document>& documents, const LoadOptions& options) {
  return FlagSetBuilder(options).build(documents);
}

LoadResult load_flag_text(std::string text, const std::string& file, const LoadOptions& options,
                          SourceFormat format) {
  Diagnostic err;
  auto doc = parse_document(std::move(text), file, format, &err);
  if (!doc) {
    LoadResult r;
    r.diagnostics.push_back(std::move(err));
    return r;
  }
  std::vector<Document> docs;
  docs.push_back(std::move(*doc));
  return build_flag_set(docs, options);
}

namespace {

bool read_file(const std::string& path, std::string* out, Diagnostic* err) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    *err = {Severity::kError, path, 0, 0, "cannot open: " + std::generic_category().message(errno)};
    return false;
  }
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) {
    *err = {Severity::kError, path, 0, 0, "read error"};
    return false;
  }
  *out = std::move(ss).str();
  return true;
}

}  // namespace

LoadResult load_flag_source(const std::string& path, const LoadOptions& options) {
  namespace fs = std::filesystem;
  LoadResult failed;
  std::error_code ec;
  std::vector<std::string> files;
  if (fs::is_directory(path, ec)) {
    for (const auto& entry : fs::directory_iterator(path, ec)) {
      const std::string name = entry.path().filename().string();
      if (name.empty() || name[0] == '.') continue;
      const std::string ext = entry.path().extension().string();
      if (ext != ".json" && ext != ".yaml" && ext != ".yml") continue;
      if (!fs::is_regular_file(entry.path(), ec)) continue;  // follows symlinks
      files.push_back(entry.path().string());
    }
    if (ec) {
      failed.diagnostics.push_back({Severity::kError, path, 0, 0, "cannot list: " + ec.message()});
      return failed;
    }
    std::sort(files.begin(), files.end());
    if (files.empty()) {
      failed.diagnostics.push_back(
          {Severity::kError, path, 0, 0, "no *.json, *.yaml or *.yml flag files in directory"});
      return failed;
    }
  } else {
    files.push_back(path);
  }
  std::vector<Document> docs;
  for (const auto& f : files) {
    std::string text;
    Diagnostic err;
    if (!read_file(f, &text, &err)) {
      failed.diagnostics.push_back(std::move(err));
      return failed;
    }
    auto doc = parse_document(std::move(text), f, SourceFormat::kAuto, &err);
    if (!doc) {
      failed.diagnostics.push_back(std::move(err));
      return failed;
    }
    docs.push_back(std::move(*doc));
  }
  return build_flag_set(docs, options);
}

}  // namespace memsnap::flags
