#include "tools/exporter/log_format.h"

#include <spdlog/pattern_formatter.h>

#include <nlohmann/json.hpp>

namespace memsnap::exporter {
namespace {

// %* : the message as a JSON string (escaped), for JSON-lines logs. Bytes that are not UTF-8 (a
// path may hold any) are replaced (U+FFFD): dump() would otherwise throw, and spdlog would drop
// the whole line.
class JsonMessageFlag : public spdlog::custom_flag_formatter {
 public:
  void format(const spdlog::details::log_msg& msg, const std::tm&,
              spdlog::memory_buf_t& dest) override {
    const std::string text = nlohmann::json(std::string(msg.payload.data(), msg.payload.size()))
                                 .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    dest.append(text.data(), text.data() + text.size());
  }
  std::unique_ptr<custom_flag_formatter> clone() const override {
    return std::make_unique<JsonMessageFlag>();
  }
};

}  // namespace

std::unique_ptr<spdlog::formatter> log_formatter(bool json, std::string_view text_tag,
                                                 std::string_view program) {
  auto formatter = std::make_unique<spdlog::pattern_formatter>();
  if (json) {
    // program is a fixed name (no '%', nothing to escape in JSON).
    const std::string who =
        program.empty() ? "" : "\"program\":\"" + std::string(program) + "\",\"pid\":%P,";
    formatter->add_flag<JsonMessageFlag>('*').set_pattern(
        R"({"time":"%Y-%m-%dT%H:%M:%S.%e%z","level":"%l","thread":%t,)" + who + R"("msg":%*})");
  } else {
    formatter->set_pattern("%Y-%m-%d %H:%M:%S.%e %^%l%$ " + std::string(text_tag) + ": %v");
  }
  return formatter;
}

}  // namespace memsnap::exporter
