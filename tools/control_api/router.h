// Internal to control_api: route patterns, matching, and the target/percent-decoding helpers.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "tools/control_api/http_server.h"

namespace memsnap::control_api::detail {

// Decodes %XX escapes (and '+' as a space when plus_is_space). nullopt on a bad escape.
std::optional<std::string> percent_decode(std::string_view text, bool plus_is_space);

// Splits an origin-form target ("/a/b?x=1") into path and query into `request`.
// False (and `error` set) when the target is not origin-form or an escape is bad.
bool parse_target(std::string_view target, Request& request, std::string& error);

class Router {
 public:
  // Throws std::invalid_argument (see HttpServer::route).
  void add(std::string method, std::string pattern, Handler handler);
  // Fills request.path_params and runs the handler; 404, 405 or 500 as documented. Never throws.
  Response dispatch(Request request) const;

 private:
  struct Segment {
    bool capture = false;
    std::string text;  // the literal, or the capture's name
  };
  struct Route {
    std::string method;
    std::string pattern;
    std::vector<Segment> segments;
    Handler handler;
  };
  // Segments of a path ("/a/b" -> {"a","b"}; "/" -> {}). Empty segments are kept as "".
  static std::vector<std::string_view> split(std::string_view path);
  static bool matches(const Route& route, const std::vector<std::string_view>& parts);
  // True if a is preferred over b (a literal where they first differ).
  static bool more_specific(const Route& a, const Route& b);

  std::vector<Route> routes_;
};

}  // namespace memsnap::control_api::detail
