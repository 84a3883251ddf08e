// The request and event JSON between memsnapd and memsnap-exporter: every field round-trips,
// and what a background export cannot take is refused before any process is started.
#include "tools/exporter/export_protocol.h"

#include <gtest/gtest.h>
#include <spdlog/logger.h>
#include <spdlog/sinks/ostream_sink.h>

#include <sstream>

#include "core/report_json.h"
#include "tools/exporter/log_format.h"

namespace memsnap::exporter {
namespace {

ExporterRequest full_request() {
  ExporterRequest r;
  PauseRequest& p = r.pause;
  p.memfd = 17;  // the caller's number: the exporter's is always kMemfdFd
  p.guest_size = 64ULL << 20;
  p.block_size = 2u << 20;
  p.reader_limits.max_guest_size = 1ULL << 40;
  p.dirty = std::vector<plugin::ByteRange>{{0, 4096}, {1ULL << 20, 8192}};
  p.strategy = "memfd";
  p.strategy_options = {{"chunk_bytes", "2097152"}, {"x", "y"}};
  p.allow_fallback = true;
  p.fallback_strategy = "hole_punch";
  p.out_path = "/snap/sb-1/generation-2.snap";
  p.parent_path = "/snap/sb-1/generation-1.snap";
  p.stay_frozen = true;
  p.sync = false;
  p.data_write = DataWrite::kDirect;
  r.plugins = {"/lib/memsnap/plugins/memsnap_memfd.so", "/lib/memsnap/plugins/x.so"};
  r.retry_interval = std::chrono::milliseconds(2500);
  return r;
}

TEST(ExportProtocolTest, RequestRoundTripsEveryField) {
  const ExporterRequest sent = full_request();
  auto got = request_from_json(nlohmann::json::parse(to_json(sent).dump()));
  ASSERT_TRUE(got.ok()) << got.error().to_string();
  const PauseRequest& a = sent.pause;
  const PauseRequest& b = got->pause;
  EXPECT_EQ(b.memfd, kMemfdFd);
  EXPECT_EQ(b.pid, -1);
  EXPECT_FALSE(b.freeze);
  EXPECT_EQ(b.guest_size, a.guest_size);
  EXPECT_EQ(b.block_size, a.block_size);
  EXPECT_EQ(b.reader_limits.max_guest_size, a.reader_limits.max_guest_size);
  ASSERT_TRUE(b.dirty.has_value());
  ASSERT_EQ(b.dirty->size(), 2u);
  EXPECT_EQ((*b.dirty)[1].offset, 1ULL << 20);
  EXPECT_EQ((*b.dirty)[1].length, 8192u);
  EXPECT_EQ(b.strategy, a.strategy);
  EXPECT_EQ(b.strategy_options, a.strategy_options);
  EXPECT_EQ(b.allow_fallback, a.allow_fallback);
  EXPECT_EQ(b.fallback_strategy, a.fallback_strategy);
  EXPECT_EQ(b.out_path, a.out_path);
  EXPECT_EQ(b.parent_path, a.parent_path);
  EXPECT_EQ(b.stay_frozen, a.stay_frozen);
  EXPECT_EQ(b.sync, a.sync);
  EXPECT_EQ(b.data_write, a.data_write);
  EXPECT_EQ(got->plugins, sent.plugins);
  EXPECT_EQ(got->retry_interval, sent.retry_interval);

  ExporterRequest seek_data = sent;
  seek_data.pause.dirty.reset();  // nullopt: SEEK_DATA, not "nothing"
  auto again = request_from_json(to_json(seek_data));
  ASSERT_TRUE(again.ok()) << again.error().to_string();
  EXPECT_FALSE(again->pause.dirty.has_value());
}

TEST(ExportProtocolTest, WhatABackgroundExportCannotTakeIsRefused) {
  const auto refused = [](auto change) {
    ExporterRequest r = full_request();
    change(r);
    const Status s = check_background_request(r);
    return !s.ok() && s.error().code == Errc::kInvalidArgument;
  };
  EXPECT_FALSE(refused([](ExporterRequest&) {}));
  EXPECT_TRUE(refused([](ExporterRequest& r) { r.pause.pid = 42; }));
  EXPECT_TRUE(refused([](ExporterRequest& r) { r.pause.regions = {{0, 0x7f0000000000, 4096}}; }));
  EXPECT_TRUE(refused([](ExporterRequest& r) { r.pause.freeze = true; }));
  EXPECT_TRUE(refused([](ExporterRequest& r) {
    r.pause.dirty_source = [](std::string*) -> Result<std::vector<plugin::ByteRange>> {
      return std::vector<plugin::ByteRange>{};
    };
  }));
  EXPECT_TRUE(refused([](ExporterRequest& r) { r.pause.memfd = -1; }));
  EXPECT_TRUE(refused([](ExporterRequest& r) { r.pause.out_path.clear(); }));
  EXPECT_TRUE(refused([](ExporterRequest& r) { r.plugins.clear(); }));

  auto j = to_json(full_request());
  j["version"] = kProtocolVersion + 1;
  EXPECT_FALSE(request_from_json(j).ok());
  j = to_json(full_request());
  j.erase("out_path");
  EXPECT_FALSE(request_from_json(j).ok());
  j = to_json(full_request());
  j["data_write"] = "sideways";
  EXPECT_FALSE(request_from_json(j).ok());
  j = to_json(full_request());
  j["retry_interval_ms"] = 0;
  EXPECT_FALSE(request_from_json(j).ok());
}

PauseReport sample_report() {
  PauseReport r;
  r.requested_strategy = "memfd";
  r.strategy = "memfd";
  r.snapshot_path = "/snap/a.snap";
  r.snapshot_id = std::string(32, 'a');
  r.parent_id = std::string(32, 'b');
  r.generation = 3;
  r.guest_size = 1ULL << 30;
  r.block_size = 4096;
  r.dirty_bytes = 12345 * 4096ULL;
  r.dirty_set_source = "every populated page of the memfd (SEEK_DATA)";
  r.data_blocks = 11;
  r.zero_blocks = 12;
  r.parent_blocks = 13;
  r.data_bytes = 14;
  r.data_write = "direct";
  r.data_write_fallback = "";
  r.export_stats = {15, 16, 17, 18, 19};
  r.phases = {
      {"resolve", 0.5, 0.25}, {"dirty_set", 1, 0.5}, {"export", 2, 1.5}, {"commit", 3, 0.75}};
  r.wall_seconds = 6.5;
  r.cpu_seconds = 3;
  return r;
}

TEST(ExportProtocolTest, EventsRoundTripWithTheirReportOrError) {
  ExportEvent durable;
  durable.kind = EventKind::kDurable;
  durable.attempt = 2;
  durable.bytes_done = durable.bytes_total = 12345 * 4096ULL;
  durable.cpu_seconds = 0.125;
  durable.report = sample_report();
  const std::string line = encode_event(durable);
  EXPECT_EQ(line.find('\n'), std::string::npos);
  auto got = decode_event(line);
  ASSERT_TRUE(got.ok()) << got.error().to_string();
  EXPECT_EQ(got->kind, EventKind::kDurable);
  EXPECT_EQ(got->attempt, 2);
  EXPECT_EQ(got->bytes_done, durable.bytes_done);
  EXPECT_EQ(got->bytes_total, durable.bytes_total);
  EXPECT_DOUBLE_EQ(got->cpu_seconds, 0.125);
  ASSERT_TRUE(got->report.has_value());
  // Every field: the JSON of the report read back is the JSON of the report sent.
  EXPECT_EQ(to_json(*got->report), to_json(*durable.report));
  ASSERT_EQ(got->report->phases.size(), 4u);
  EXPECT_EQ(got->report->phases[2].name, "export");  // the pipeline's order, not the JSON's

  ExportEvent failed;
  failed.kind = EventKind::kFailed;
  failed.error = make_error(Errc::kDataAtRisk, "disk full; kept in /x", 28);
  failed.retryable = false;
  auto f = decode_event(encode_event(failed));
  ASSERT_TRUE(f.ok()) << f.error().to_string();
  ASSERT_TRUE(f->error.has_value());
  EXPECT_EQ(f->error->code, Errc::kDataAtRisk);
  EXPECT_EQ(f->error->message, "disk full; kept in /x");
  EXPECT_EQ(f->error->sys_errno, 28);
  EXPECT_FALSE(f->retryable);

  EXPECT_FALSE(decode_event("{\"event\":\"durable\",\"attempt\":1,\"bytes_done\":0,"
                            "\"bytes_total\":0,\"cpu_seconds\":0}")
                   .ok());  // durable without its report
  EXPECT_FALSE(decode_event("{\"event\":\"paused\",\"attempt\":1,\"bytes_done\":0,"
                            "\"bytes_total\":0,\"cpu_seconds\":0}")
                   .ok());
  EXPECT_FALSE(decode_event("not json").ok());
}

TEST(ExportProtocolTest, EveryErrorCodeIsReadBackByName) {
  for (int i = 0; i <= static_cast<int>(Errc::kDataAtRisk); ++i) {
    const auto code = static_cast<Errc>(i);
    EXPECT_EQ(errc_from_name(errc_name(code)), code) << errc_name(code);
  }
  EXPECT_EQ(errc_from_name("no_such_code"), Errc::kInternal);
}

// What log_formatter writes: one JSON object a line, naming the exporter -- even for a message
// that is not UTF-8 (a snapshot path may hold any bytes): such a line is written with the bad
// bytes replaced, never dropped.
TEST(LogFormatTest, JsonLinesNameTheProgramAndSurviveBytesThatAreNotUtf8) {
  std::ostringstream out;
  auto sink = std::make_shared<spdlog::sinks::ostream_sink_mt>(out);
  spdlog::logger logger("log-format-test", sink);
  logger.set_formatter(log_formatter(true, "memsnap-exporter[%P]", "memsnap-exporter"));
  logger.critical("holding the guest memory of /snapshots/a\xff\xfe.snap");
  logger.info("plain \"quoted\" text");
  std::istringstream lines(out.str());
  std::vector<nlohmann::json> parsed;
  for (std::string line; std::getline(lines, line);) {
    parsed.push_back(nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false));
    ASSERT_TRUE(parsed.back().is_object()) << "not JSON: " << line;
  }
  ASSERT_EQ(parsed.size(), 2u) << out.str();
  EXPECT_EQ(parsed[0]["program"], "memsnap-exporter");
  EXPECT_EQ(parsed[0]["level"], "critical");
  EXPECT_NE(parsed[0]["msg"].get<std::string>().find("holding the guest memory of /snapshots/a"),
            std::string::npos);
  EXPECT_EQ(parsed[1]["msg"], "plain \"quoted\" text");

  std::ostringstream text_out;
  auto text_sink = std::make_shared<spdlog::sinks::ostream_sink_mt>(text_out);
  spdlog::logger text_logger("log-format-text-test", text_sink);
  text_logger.set_formatter(log_formatter(false, "memsnapd"));
  text_logger.warn("hello");
  EXPECT_NE(text_out.str().find(" warning memsnapd: hello"), std::string::npos) << text_out.str();
}

}  // namespace
}  // namespace memsnap::exporter
