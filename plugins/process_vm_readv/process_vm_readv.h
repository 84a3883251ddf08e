// The process_vm_readv strategy: copies guest memory out of the VMM's address space.
//
// Requested guest ranges are translated through ExportRequest::regions to host addresses of the
// VMM (a range may span several regions), read with process_vm_readv(2) into one bounded local
// buffer and handed to the sink in batches of chunks. A syscall reads at most IOV_MAX remote
// iovecs and max_call_bytes bytes; after a partial read the next call starts at the first byte
// not read.
//
// Options (all decimal integers):
//   buffer_bytes        local buffer, a multiple of 4096 in [4096, 1 GiB] and at least the block
//                       size; default 4 MiB (measured best of 2/4/8/16 MiB here)
//   max_call_bytes      bytes per syscall, in [1, MAX_RW_COUNT]; default MAX_RW_COUNT
//   enomem_retries      retries after ENOMEM before kNoMemory, in [0, 64]; default 8
//   enomem_backoff_us   first sleep after ENOMEM, doubled each retry (capped at 1 s), in
//                       [0, 1000000]; default 1000
//
// Errors: kUnsupported without a pid; kInvalidArgument for a malformed request; kBadAddress for
// a range outside every region or an unmapped host address (EFAULT, or a call that made no
// progress), naming the host address and guest offset; kProcessGone on ESRCH; kNoMemory when
// ENOMEM persists; kSinkError when the sink refuses a write; kIoError for other errors.
// Memory use: buffer_bytes plus a chunk list bounded by buffer_bytes / 4096, allocated per export.
//
// What bounds it (issue 18 part 3; memsnap-bench BM_PvrPipeline / BM_PvrExport, 1 GiB, 2-CPU VM
// under other builds, docs/performance.md): CPU, not I/O. Per GiB the copy in (process_vm_readv)
// costs about 0.15-0.18 CPU-s, the write() into the new file's page cache 0.14-0.32, the sink's
// zero scan and checksums 0.07-0.15 more: a full export takes 0.42-0.50 CPU-s, about twice the
// best write() reference's own CPU, so it can reach about 0.5x of that reference on one free CPU.
// Buffer size made no measurable difference from 256 KiB to 4 MiB (16 MiB had the slowest
// median, probably as the buffer no longer stays in cache between the copy in, the scan and the
// write). Remote iovecs of 4 KiB read 30-50% slower at best than one iovec per region
// (contiguous ranges are merged, so only a scattered diff pays this). A reader thread
// overlapping the reads with the sink's writes was measured (commit a158e4f) and left out: no
// consistent gain with the sink's hashing helper already on the second CPU, and its CPU would
// escape the pause's report.
#pragma once

#include <sys/types.h>
#include <sys/uio.h>

#include <cstddef>
#include <cstdint>

#include "plugins/plugin_api/plugin_api.h"

namespace memsnap::plugins {

struct ProcessVmReadvOptions {
  // INT_MAX & ~(4096 - 1): the kernel's MAX_RW_COUNT, the most one read/write moves.
  static constexpr std::uint64_t kMaxRwCount = 0x7ffff000;

  std::uint64_t buffer_bytes = 4u << 20;
  std::uint64_t max_call_bytes = kMaxRwCount;
  std::uint32_t enomem_retries = 8;
  std::uint64_t enomem_backoff_us = 1000;
};

// Parses options into *out (defaults for keys not given). Unknown keys and bad values are
// kInvalidArgument.
plugin::Status parse_process_vm_readv_options(const plugin::Option* options, std::size_t count,
                                              ProcessVmReadvOptions* out) noexcept;

// Not thread-safe: one export at a time (the ABI never calls it concurrently).
class ProcessVmReadvStrategy final : public plugin::Strategy {
 public:
  // Same contract as process_vm_readv(2) with flags 0: returns bytes read or -1 with errno set.
  using ReadvFn = ssize_t (*)(void* context, pid_t pid, const struct iovec* local,
                              unsigned long local_count, const struct iovec* remote,
                              unsigned long remote_count);

  explicit ProcessVmReadvStrategy(const ProcessVmReadvOptions& options) noexcept;

  // Adds what it did to stats. Never throws.
  plugin::Status export_ranges(const plugin::ExportRequest& request, plugin::BlockSink& sink,
                               plugin::ExportStats& stats) noexcept override;

  // Replaces the syscall, e.g. to inject EINTR / ENOMEM / partial reads. context is passed back
  // to fn and must outlive the strategy's exports. nullptr restores the real syscall.
  void set_syscall_for_test(ReadvFn fn, void* context) noexcept;

  const ProcessVmReadvOptions& options() const noexcept { return options_; }

 private:
  static ssize_t real_readv(void* context, pid_t pid, const struct iovec* local,
                            unsigned long local_count, const struct iovec* remote,
                            unsigned long remote_count);

  ProcessVmReadvOptions options_;
  ReadvFn readv_ = &ProcessVmReadvStrategy::real_readv;
  void* readv_context_ = nullptr;
};

// The factory: parses options and on success stores a new ProcessVmReadvStrategy in *out (owned
// by the caller).
plugin::Status create_process_vm_readv(plugin::Strategy** out, const plugin::Option* options,
                                       std::size_t count) noexcept;

}  // namespace memsnap::plugins
