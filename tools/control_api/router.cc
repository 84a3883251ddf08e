// Route patterns and dispatch for the control API (see http_server.h).
#include "tools/control_api/router.h"

#include <algorithm>
#include <exception>
#include <set>
#include <stdexcept>
#include <utility>

#include <spdlog/spdlog.h>
#include <nlohmann/json.hpp>

namespace memsnap::control_api {

Response json_error(int status, std::string_view code, std::string_view message) {
  nlohmann::json body = {
      {"error", {{"code", std::string(code)}, {"message", std::string(message)}}}};
  Response r;
  r.status = status;
  // `replace`: a message built from bytes a client sent may be invalid UTF-8.
  r.body = body.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  return r;
}

namespace detail {
namespace {

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// RFC 9110 token characters (methods).
bool is_token(std::string_view s) {
  if (s.empty()) return false;
  return std::all_of(s.begin(), s.end(), [](char c) {
    const auto u = static_cast<unsigned char>(c);
    if (u <= 32 || u >= 127) return false;
    return std::string_view("\"(),/:;<=>?@[\\]{}").find(c) == std::string_view::npos;
  });
}

}  // namespace

std::optional<std::string> percent_decode(std::string_view text, bool plus_is_space) {
  std::string out;
  out.reserve(text.size());
  for (std::size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (c == '%') {
      if (i + 2 >= text.size()) return std::nullopt;  // needs two hex digits
      const int hi = hex_value(text[i + 1]);
      const int lo = hex_value(text[i + 2]);
      if (hi < 0 || lo < 0) return std::nullopt;
      out.push_back(static_cast<char>(hi * 16 + lo));
      i += 2;
    } else if (c == '+' && plus_is_space) {
      out.push_back(' ');
    } else {
      out.push_back(c);
    }
  }
  return out;
}

bool parse_target(std::string_view target, Request& request, std::string& error) {
  if (target.empty() || target.front() != '/') {
    error = "the request target must be a path starting with '/'";
    return false;
  }
  const std::size_t hash = target.find('#');
  if (hash != std::string_view::npos) target = target.substr(0, hash);
  const std::size_t q = target.find('?');
  request.path = std::string(target.substr(0, q));
  request.query.clear();
  if (q == std::string_view::npos) return true;
  std::string_view rest = target.substr(q + 1);
  while (!rest.empty()) {
    const std::size_t amp = rest.find('&');
    const std::string_view item = rest.substr(0, amp);
    rest = amp == std::string_view::npos ? std::string_view{} : rest.substr(amp + 1);
    if (item.empty()) continue;
    const std::size_t eq = item.find('=');
    auto key = percent_decode(item.substr(0, eq), true);
    auto value = percent_decode(
        eq == std::string_view::npos ? std::string_view{} : item.substr(eq + 1), true);
    if (!key || !value) {
      error = "bad percent-escape in the query";
      return false;
    }
    request.query[std::move(*key)] = std::move(*value);
  }
  return true;
}

std::vector<std::string_view> Router::split(std::string_view path) {
  std::vector<std::string_view> parts;
  if (path.empty() || path == "/") return parts;
  std::size_t start = path.front() == '/' ? 1 : 0;
  for (;;) {
    const std::size_t slash = path.find('/', start);
    parts.push_back(path.substr(start, slash == std::string_view::npos ? slash : slash - start));
    if (slash == std::string_view::npos) break;
    start = slash + 1;
  }
  return parts;
}

void Router::add(std::string method, std::string pattern, Handler handler) {
  if (!is_token(method)) throw std::invalid_argument("route: bad method \"" + method + "\"");
  if (!handler) throw std::invalid_argument("route: empty handler for " + pattern);
  if (pattern.empty() || pattern.front() != '/' ||
      pattern.find_first_of("?#%") != std::string::npos) {
    throw std::invalid_argument(
        "route: pattern must be a path starting with '/', without "
        "'?', '#' or '%': \"" +
        pattern + "\"");
  }
  Route route{method, pattern, {}, std::move(handler)};
  std::set<std::string> names;
  for (std::string_view part : split(pattern)) {
    if (part.empty()) {
      throw std::invalid_argument("route: empty segment in \"" + pattern + "\"");
    }
    Segment seg;
    if (part.front() == '{') {
      if (part.size() < 3 || part.back() != '}' ||
          part.substr(1, part.size() - 2).find_first_of("{}") != std::string_view::npos) {
        throw std::invalid_argument("route: bad capture segment \"" + std::string(part) +
                                    "\" in \"" + pattern + "\"");
      }
      seg.capture = true;
      seg.text = std::string(part.substr(1, part.size() - 2));
      if (!names.insert(seg.text).second) {
        throw std::invalid_argument("route: capture {" + seg.text + "} twice in \"" + pattern +
                                    "\"");
      }
    } else {
      if (part.find_first_of("{}") != std::string_view::npos) {
        throw std::invalid_argument("route: braces inside a literal segment in \"" + pattern +
                                    "\"");
      }
      seg.text = std::string(part);
    }
    route.segments.push_back(std::move(seg));
  }
  for (const Route& existing : routes_) {
    if (existing.method != route.method || existing.segments.size() != route.segments.size()) {
      continue;
    }
    // Same shape (captures in the same places, same literals): the second could never match.
    const bool same = std::equal(existing.segments.begin(), existing.segments.end(),
                                 route.segments.begin(), [](const Segment& a, const Segment& b) {
                                   return a.capture == b.capture && (a.capture || a.text == b.text);
                                 });
    if (same) {
      throw std::invalid_argument("route: " + method + " " + pattern + " duplicates " +
                                  existing.method + " " + existing.pattern);
    }
  }
  routes_.push_back(std::move(route));
}

bool Router::matches(const Route& route, const std::vector<std::string_view>& parts) {
  if (route.segments.size() != parts.size()) return false;
  for (std::size_t i = 0; i < parts.size(); ++i) {
    const Segment& seg = route.segments[i];
    if (seg.capture ? parts[i].empty() : parts[i] != seg.text) return false;
  }
  return true;
}

bool Router::more_specific(const Route& a, const Route& b) {
  for (std::size_t i = 0; i < a.segments.size() && i < b.segments.size(); ++i) {
    if (a.segments[i].capture != b.segments[i].capture) return !a.segments[i].capture;
  }
  return false;
}

Response Router::dispatch(Request request) const {
  try {
    const std::vector<std::string_view> parts = split(request.path);
    const Route* best = nullptr;
    std::set<std::string> allowed;
    for (const Route& route : routes_) {
      if (!matches(route, parts)) continue;
      allowed.insert(route.method);
      if (route.method != request.method) continue;
      if (best == nullptr || more_specific(route, *best)) best = &route;
    }
    if (best == nullptr) {
      if (allowed.empty()) {
        return json_error(404, codes::kNotFound, "no such endpoint: " + request.path);
      }
      std::string allow;
      for (const std::string& m : allowed) allow += (allow.empty() ? "" : ", ") + m;
      Response r = json_error(
          405, codes::kMethodNotAllowed,
          request.method + " is not allowed on " + request.path + " (allowed: " + allow + ")");
      r.headers.emplace_back("Allow", allow);
      return r;
    }
    request.path_params.clear();
    for (std::size_t i = 0; i < parts.size(); ++i) {
      if (!best->segments[i].capture) continue;
      auto decoded = percent_decode(parts[i], false);
      if (!decoded) {
        return json_error(400, codes::kBadRequest, "bad percent-escape in the path");
      }
      request.path_params[best->segments[i].text] = std::move(*decoded);
    }
    try {
      return best->handler(request);
    } catch (const std::exception& e) {
      spdlog::warn("control api: {} {} failed: {}", request.method, request.path, e.what());
      return json_error(500, codes::kInternal, std::string("the handler failed: ") + e.what());
    } catch (...) {
      spdlog::warn("control api: {} {} failed with an unknown exception", request.method,
                   request.path);
      return json_error(500, codes::kInternal, "the handler failed with an unknown exception");
    }
  } catch (...) {
    // Building the answer itself failed (out of memory): say so without allocating much more.
    Response r;
    r.status = 500;
    r.body = R"({"error":{"code":"internal","message":"internal error"}})";
    return r;
  }
}

}  // namespace detail
}  // namespace memsnap::control_api
