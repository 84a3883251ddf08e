// A parsed JSON or YAML flag source: the value as nlohmann::json plus the line and column of
// every node, so validation errors can say file:line:col. Parsing is depth-limited and never
// recurses on the input's nesting (JSON goes through nlohmann's iterative SAX parser; YAML through
// yaml-cpp, whose own recursion is capped, then a depth-checked conversion).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "flags/types.h"

namespace memsnap::flags {

// Deeper documents are refused with a diagnostic.
inline constexpr int kMaxDocumentDepth = 256;

struct Position {
  int line = 0;  // 1-based
  int col = 0;   // 1-based, in bytes
};

struct Document {
  std::string file;
  Json root;
  std::uint64_t text_hash = 0;  // FNV-1a of the text it was parsed from
  // Where each node (and each object member's key) starts, by the node's address inside root:
  // stable, since nodes are never added or moved after parsing. Sorted by address. Cheaper to
  // build than a map of JSON pointers, which matters for loading thousands of flags.
  std::vector<std::pair<const Json*, Position>> value_positions;
  std::vector<std::pair<const Json*, Position>> key_positions;
  Position root_position;

  // Where the node at pointer (RFC 6901, or its nearest recorded ancestor) starts; a pointer
  // ending in "#key" asks for the member's key instead of its value.
  [[nodiscard]] Position position(std::string_view pointer) const;
  // Sorts the position tables (the parsers call it).
  void index_positions();
  [[nodiscard]] Diagnostic diagnostic(std::string_view pointer, std::string message,
                                      Diagnostic::Severity severity) const;
};

enum class SourceFormat { kAuto, kJson, kYaml };

// Parses text (named file in diagnostics). kAuto: by extension (.json / .yaml / .yml), else by
// the first non-blank character ('{' or '[' means JSON). On failure, the diagnostic says where.
// Duplicate object keys are errors.
std::optional<Document> parse_document(std::string text, const std::string& file,
                                       SourceFormat format, Diagnostic* error);

// Appends "/" + token, escaped per RFC 6901.
std::string pointer_append(std::string_view base, std::string_view token);

}  // namespace memsnap::flags
