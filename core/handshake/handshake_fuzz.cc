// libFuzzer target: the VMM's handshake payload (Firecracker's JSON region list) through
// parse_regions(), the function Listener::accept() hands every received payload to.
//
// Input: [expectation byte] [payload]. The byte picks the expectations the payload is checked
// against: bits 0-1 the expected page size (any, 4 KiB, 2 MiB, an invalid 12 KiB), bit 2 an
// expected guest size of 4 pages. Payloads longer than Expectations::max_payload never reach the
// parser (accept() refuses them first), so neither do they here.
// Whatever it accepts must satisfy the documented contract: regions sorted by offset, contiguous
// from 0, one page size, aligned, not overlapping in host memory; it also round-trips through
// serialize_regions().
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "core/handshake/handshake.h"

using memsnap::handshake::Expectations;
using memsnap::handshake::GuestRegion;

namespace {

void check(bool ok) {
  if (!ok) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 1) return 0;
  Expectations expect;
  static constexpr std::uint64_t kPageSizes[] = {0, 4096, 2 << 20, 12288};
  expect.page_size = kPageSizes[data[0] & 3];
  const std::string_view payload(reinterpret_cast<const char*>(data + 1), size - 1);
  if (payload.size() > expect.max_payload) return 0;
  const std::uint64_t page = expect.page_size == 0 ? 4096 : expect.page_size;
  if ((data[0] & 4) != 0) expect.guest_size = 4 * page;

  auto parsed = memsnap::handshake::parse_regions(payload, expect);
  if (!parsed.ok()) {
    check(!parsed.error().message.empty());
    return 0;
  }
  const auto& regions = parsed.value();
  check(!regions.empty());
  std::uint64_t next = 0;
  for (const GuestRegion& r : regions) {
    check(r.page_size >= 4096 && (r.page_size & (r.page_size - 1)) == 0);
    check(r.page_size == regions.front().page_size);
    check(expect.page_size == 0 || r.page_size == expect.page_size);
    check(r.size != 0 && r.size % r.page_size == 0);
    check(r.base_host_virt_addr % r.page_size == 0);
    check(r.offset == next);
    next += r.size;
  }
  check(expect.guest_size == 0 || next == expect.guest_size);
  for (std::size_t i = 0; i < regions.size(); ++i) {
    for (std::size_t j = i + 1; j < regions.size(); ++j) {
      const GuestRegion& a = regions[i];
      const GuestRegion& b = regions[j];
      check(a.base_host_virt_addr + a.size <= b.base_host_virt_addr ||
            b.base_host_virt_addr + b.size <= a.base_host_virt_addr);
    }
  }
  auto again = memsnap::handshake::parse_regions(memsnap::handshake::serialize_regions(regions),
                                                 expect);
  check(again.ok() && again.value() == regions);
  return 0;
}
