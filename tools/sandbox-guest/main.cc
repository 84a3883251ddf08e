// memsnap-guest: a stand-in for a VMM, for tests, benchmarks and demos. It holds "guest memory"
// (anonymous memory or a memfd, mapped as one or more regions), fills it with a verifiable
// per-page pattern, and then obeys one command per line on stdin, answering one JSON line each:
//
//   dirty FRACTION random|sequential SEED   write a new generation into that share of the pages
//   verify                                  check every page against the generation it should hold
//   ping                                    {"ok":true}
//   exit
//
// At start it prints its layout: {"pid", "backing", "memfd_fd", "guest_size", "page_size",
// "seed", "generation", "regions":[{"guest_offset","host_addr","size"}]}. memsnap can SIGSTOP and
// SIGCONT it like any VMM.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/pattern.h"

namespace {

using nlohmann::json;
constexpr std::uint64_t kPage = 4096;

struct Options {
  std::uint64_t size = 64ULL << 20;
  std::string backing = "memfd";
  int regions = 1;
  bool thp = false;
  std::uint64_t seed = 1;
  double zero_fraction = 0.0;
  std::string memfd_name = "memsnap-guest";
};

[[noreturn]] void usage(const std::string& why) {
  std::fprintf(stderr,
               "memsnap-guest: %s\n"
               "usage: memsnap-guest [--size BYTES[K|M|G]] [--backing anon|memfd] [--regions N]\n"
               "                     [--thp] [--seed N] [--zero-fraction F] [--memfd-name NAME]\n",
               why.c_str());
  std::exit(2);
}

std::uint64_t parse_size(const std::string& s) {
  char* end = nullptr;
  std::uint64_t v = std::strtoull(s.c_str(), &end, 10);
  if (end == s.c_str()) usage("bad size " + s);
  switch (*end) {
    case 'G':
    case 'g':
      v <<= 30;
      break;
    case 'M':
    case 'm':
      v <<= 20;
      break;
    case 'K':
    case 'k':
      v <<= 10;
      break;
    case '\0':
      break;
    default:
      usage("bad size " + s);
  }
  return v;
}

Options parse_args(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) usage(a + " needs a value");
      return argv[++i];
    };
    if (a == "--size")
      o.size = parse_size(next());
    else if (a == "--backing")
      o.backing = next();
    else if (a == "--regions")
      o.regions = std::atoi(next().c_str());
    else if (a == "--thp")
      o.thp = true;
    else if (a == "--seed")
      o.seed = std::strtoull(next().c_str(), nullptr, 10);
    else if (a == "--zero-fraction")
      o.zero_fraction = std::atof(next().c_str());
    else if (a == "--memfd-name")
      o.memfd_name = next();
    else
      usage("unknown argument " + a);
  }
  if (o.backing != "anon" && o.backing != "memfd") usage("--backing is anon or memfd");
  if (o.size == 0 || o.size % kPage != 0) usage("--size must be a positive multiple of 4 KiB");
  if (o.regions < 1 || o.size / kPage < static_cast<std::uint64_t>(o.regions))
    usage("bad --regions");
  return o;
}

struct Region {
  std::uint64_t guest_offset;
  char* host;
  std::uint64_t size;
};

class Guest {
 public:
  explicit Guest(const Options& o) : o_(o), expected_(o.size / kPage, 0) {
    if (o.backing == "memfd") {
      memfd_ = memfd_create(o.memfd_name.c_str(), MFD_CLOEXEC);
      if (memfd_ < 0 || ftruncate(memfd_, static_cast<off_t>(o.size)) != 0) die("memfd");
    }
    const std::uint64_t pages = o.size / kPage;
    std::uint64_t offset = 0;
    for (int i = 0; i < o.regions; ++i) {
      const std::uint64_t region_pages =
          pages / o.regions + (static_cast<std::uint64_t>(i) < pages % o.regions ? 1 : 0);
      const std::uint64_t size = region_pages * kPage;
      void* p = memfd_ >= 0 ? mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, memfd_,
                                   static_cast<off_t>(offset))
                            : mmap(nullptr, size, PROT_READ | PROT_WRITE,
                                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (p == MAP_FAILED) die("mmap");
      madvise(p, size, o.thp ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
      regions_.push_back({offset, static_cast<char*>(p), size});
      offset += size;
    }
    std::vector<bool> zero(pages, false);
    for (std::uint64_t p : memsnap::pattern::never_written_pages(pages, o.zero_fraction, o.seed)) {
      zero[p] = true;
    }
    generation_ = 1;
    for (std::uint64_t p = 0; p < pages; ++p) {
      if (zero[p]) continue;
      memsnap::pattern::fill_page(page(p), kPage, o.seed, p, generation_);
      expected_[p] = static_cast<std::uint32_t>(generation_);
    }
  }

  json layout() const {
    json regions = json::array();
    for (const auto& r : regions_) {
      regions.push_back({{"guest_offset", r.guest_offset},
                         {"host_addr", reinterpret_cast<std::uint64_t>(r.host)},
                         {"size", r.size}});
    }
    return {{"pid", getpid()},           {"backing", o_.backing}, {"memfd_fd", memfd_},
            {"guest_size", o_.size},     {"page_size", kPage},    {"seed", o_.seed},
            {"generation", generation_}, {"regions", regions}};
  }

  json dirty(double fraction, bool sequential, std::uint64_t seed) {
    ++generation_;
    const auto pages = memsnap::pattern::select_pages(expected_.size(), fraction, seed, sequential);
    json ranges = json::array();
    std::uint64_t run_start = 0, run_end = 0;
    for (std::uint64_t p : pages) {
      memsnap::pattern::fill_page(page(p), kPage, o_.seed, p, generation_);
      expected_[p] = static_cast<std::uint32_t>(generation_);
      if (run_end != run_start && p * kPage == run_end) {
        run_end += kPage;
        continue;
      }
      if (run_end != run_start) ranges.push_back({run_start, run_end - run_start});
      run_start = p * kPage;
      run_end = run_start + kPage;
    }
    if (run_end != run_start) ranges.push_back({run_start, run_end - run_start});
    return {{"generation", generation_}, {"pages", pages.size()}, {"dirty", ranges}};
  }

  json verify() const {
    std::uint64_t mismatches = 0;
    json first = json::array();
    for (std::uint64_t p = 0; p < expected_.size(); ++p) {
      const auto c = memsnap::pattern::check_page(page(p), kPage, o_.seed, p, expected_[p]);
      if (c.ok) continue;
      if (++mismatches <= 10) {
        first.push_back({{"page", p},
                         {"expected_generation", expected_[p]},
                         {"found_page", c.found_page},
                         {"found_generation", c.found_generation}});
      }
    }
    return {{"pages", expected_.size()}, {"mismatches", mismatches}, {"first_mismatches", first}};
  }

 private:
  [[noreturn]] static void die(const char* what) {
    std::perror(what);
    std::exit(1);
  }
  char* page(std::uint64_t p) const {
    const std::uint64_t off = p * kPage;
    for (const auto& r : regions_) {
      if (off >= r.guest_offset && off < r.guest_offset + r.size)
        return r.host + (off - r.guest_offset);
    }
    std::abort();
  }

  Options o_;
  int memfd_ = -1;
  std::vector<Region> regions_;
  std::vector<std::uint32_t> expected_;
  std::uint64_t generation_ = 0;
};

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse_args(argc, argv);
  Guest guest(o);
  std::cout << guest.layout().dump() << std::endl;
  std::string line;
  while (std::getline(std::cin, line)) {
    std::istringstream in(line);
    std::string cmd;
    in >> cmd;
    if (cmd == "dirty") {
      double fraction = 0;
      std::string mode;
      std::uint64_t seed = 0;
      if (!(in >> fraction >> mode >> seed) || (mode != "random" && mode != "sequential")) {
        std::cout << json{{"error", "usage: dirty FRACTION random|sequential SEED"}}.dump()
                  << std::endl;
        continue;
      }
      std::cout << guest.dirty(fraction, mode == "sequential", seed).dump() << std::endl;
    } else if (cmd == "verify") {
      std::cout << guest.verify().dump() << std::endl;
    } else if (cmd == "ping") {
      std::cout << json{{"ok", true}}.dump() << std::endl;
    } else if (cmd == "exit") {
      return 0;
    } else if (!cmd.empty()) {
      std::cout << json{{"error", "unknown command " + cmd}}.dump() << std::endl;
    }
  }
  return 0;
}
