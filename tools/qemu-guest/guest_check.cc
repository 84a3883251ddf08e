// memsnap-guest-check: the memory check that runs inside the QEMU test guest (started by the
// initramfs /init, its output on the serial console). It fills guest memory with data it can
// recompute, verifies all of it every round, then changes a few percent of it, so a host that
// pauses and resumes the VM can read from the console whether guest memory came back intact.
//
// Settings from /proc/cmdline (the kernel command line):
//   memsnap.mib=N           MiB to allocate and check (default 64)
//   memsnap.seed=S          seed of the data pattern (default 1)
//   memsnap.dirty_pct=P     percent of the pages rewritten per round (default 5)
//   memsnap.interval_ms=T   sleep between rounds (default 300)
//
// Console lines (one write(2) each, so they are never interleaved or buffered):
//   MEMSNAP-CHECK ready mib=N seed=S first_pfn=F         F = guest frame of checked page 0
//   MEMSNAP-CHECK ok round=R pages=N gens=G              G = sum of page generations
//   MEMSNAP-CHECK BAD round=R page=X expected_gen=E bad_pages=K   X = first bad page
//   MEMSNAP-CHECK FATAL <reason>                         setup failed; exits with status 1
//
// Page p of generation g holds 512 words of an xorshift64 stream seeded by mix(seed, p, g); the
// generation of every page lives in an array in guest memory too, so a restore that loses any
// part of guest memory (data or the array) shows up as BAD or as a crash. Page 0 is never
// rewritten and its guest frame is printed, so a host test can damage it on purpose in a snapshot
// and see the guest report it (the check can fail).
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <fstream>
#include <sstream>
#include <string>

namespace {

constexpr std::size_t kPageSize = 4096;
constexpr std::size_t kWordsPerPage = kPageSize / sizeof(std::uint64_t);

struct Settings {
  std::uint64_t mib = 64;
  std::uint64_t seed = 1;
  std::uint64_t dirty_pct = 5;
  std::uint64_t interval_ms = 300;
};

// One line, one write(2): the console sees whole lines even if the guest is paused mid-round.
void emit(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void emit(const char* fmt, ...) {
  char line[256];
  va_list args;
  va_start(args, fmt);
  int n = std::vsnprintf(line, sizeof(line) - 1, fmt, args);
  va_end(args);
  if (n < 0) return;
  auto len = static_cast<std::size_t>(n);
  if (len > sizeof(line) - 2) len = sizeof(line) - 2;
  line[len++] = '\n';
  std::size_t off = 0;
  while (off < len) {
    ssize_t w = ::write(STDOUT_FILENO, line + off, len - off);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return;
    off += static_cast<std::size_t>(w);
  }
}

bool parse_u64(const std::string& text, std::uint64_t& out) {
  if (text.empty()) return false;
  char* end = nullptr;
  errno = 0;
  unsigned long long v = std::strtoull(text.c_str(), &end, 0);
  if (errno != 0 || end == nullptr || *end != '\0') return false;
  out = v;
  return true;
}

Settings read_settings() {
  Settings s;
  std::ifstream in("/proc/cmdline");
  std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::istringstream words(all);
  std::string word;
  while (words >> word) {
    auto eq = word.find('=');
    if (eq == std::string::npos) continue;
    std::string key = word.substr(0, eq);
    std::string value = word.substr(eq + 1);
    std::uint64_t v = 0;
    bool ok = parse_u64(value, v);
    if (key == "memsnap.mib" && ok && v > 0)
      s.mib = v;
    else if (key == "memsnap.seed" && ok)
      s.seed = v;
    else if (key == "memsnap.dirty_pct" && ok && v <= 100)
      s.dirty_pct = v;
    else if (key == "memsnap.interval_ms" && ok)
      s.interval_ms = v;
    else if (key.rfind("memsnap.", 0) == 0)
      emit("MEMSNAP-CHECK warning: ignoring bad setting %s", word.c_str());
  }
  return s;
}

std::uint64_t splitmix64(std::uint64_t& state) {
  std::uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// The first word of page `page` at generation `gen`; never zero (xorshift needs a non-zero state).
std::uint64_t page_start(std::uint64_t seed, std::uint64_t page, std::uint64_t gen) {
  std::uint64_t state = seed ^ (page * 0xd1b54a32d192ed03ULL) ^ (gen * 0x8cb92ba72f3d8dd7ULL);
  std::uint64_t x = splitmix64(state);
  return x == 0 ? 0x2545f4914f6cdd1dULL : x;
}

inline std::uint64_t xorshift64(std::uint64_t x) {
  x ^= x << 13;
  x ^= x >> 7;
  x ^= x << 17;
  return x;
}

void fill_page(std::uint64_t* words, std::uint64_t seed, std::uint64_t page, std::uint64_t gen) {
  std::uint64_t x = page_start(seed, page, gen);
  for (std::size_t i = 0; i < kWordsPerPage; ++i) {
    words[i] = x;
    x = xorshift64(x);
  }
}

bool page_ok(const std::uint64_t* words, std::uint64_t seed, std::uint64_t page,
             std::uint64_t gen) {
  std::uint64_t x = page_start(seed, page, gen);
  std::uint64_t diff = 0;
  for (std::size_t i = 0; i < kWordsPerPage; ++i) {
    diff |= words[i] ^ x;
    x = xorshift64(x);
  }
  return diff == 0;
}

// The guest physical frame of the page at addr (from /proc/self/pagemap; 0 if unknown).
std::uint64_t frame_of(const void* addr) {
  std::FILE* f = std::fopen("/proc/self/pagemap", "rb");
  if (f == nullptr) return 0;
  std::uint64_t entry = 0;
  const long index = static_cast<long>(reinterpret_cast<std::uintptr_t>(addr) / kPageSize);
  const bool ok = std::fseek(f, index * 8, SEEK_SET) == 0 && std::fread(&entry, 8, 1, f) == 1;
  std::fclose(f);
  if (!ok || (entry >> 63) == 0) return 0;  // not present
  return entry & ((1ULL << 55) - 1);
}

void sleep_ms(std::uint64_t ms) {
  timespec ts{static_cast<time_t>(ms / 1000), static_cast<long>((ms % 1000) * 1000000)};
  while (::nanosleep(&ts, &ts) != 0 && errno == EINTR) {
  }
}

}  // namespace

int main() {
  const Settings s = read_settings();
  const std::size_t bytes = static_cast<std::size_t>(s.mib) << 20;
  const std::size_t pages = bytes / kPageSize;

  // Locked if the kernel lets us: the guest has no swap, this only keeps the pages resident.
  (void)::mlockall(MCL_CURRENT | MCL_FUTURE);
  void* mem = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
  void* gen_mem = ::mmap(nullptr, pages * sizeof(std::uint32_t), PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
  if (mem == MAP_FAILED || gen_mem == MAP_FAILED) {
    emit("MEMSNAP-CHECK FATAL cannot map %llu MiB: %s", static_cast<unsigned long long>(s.mib),
         std::strerror(errno));
    return 1;
  }
  auto* words = static_cast<std::uint64_t*>(mem);
  auto* gen = static_cast<std::uint32_t*>(gen_mem);

  for (std::size_t p = 0; p < pages; ++p) {
    gen[p] = 0;
    fill_page(words + p * kWordsPerPage, s.seed, p, 0);
  }
  emit("MEMSNAP-CHECK ready mib=%llu seed=%llu first_pfn=%llu",
       static_cast<unsigned long long>(s.mib), static_cast<unsigned long long>(s.seed),
       static_cast<unsigned long long>(frame_of(words)));

  const std::size_t dirty_per_round = pages * s.dirty_pct / 100;
  std::uint64_t pick_state = s.seed ^ 0x6a09e667f3bcc909ULL;
  for (std::uint64_t round = 1;; ++round) {
    std::uint64_t gens = 0;
    std::size_t bad = 0;
    std::size_t first_bad = 0;
    for (std::size_t p = 0; p < pages; ++p) {
      gens += gen[p];
      if (!page_ok(words + p * kWordsPerPage, s.seed, p, gen[p])) {
        if (bad++ == 0) first_bad = p;
      }
    }
    if (bad == 0) {
      emit("MEMSNAP-CHECK ok round=%llu pages=%zu gens=%llu",
           static_cast<unsigned long long>(round), pages, static_cast<unsigned long long>(gens));
    } else {
      emit("MEMSNAP-CHECK BAD round=%llu page=%zu expected_gen=%u bad_pages=%zu",
           static_cast<unsigned long long>(round), first_bad, gen[first_bad], bad);
    }
    for (std::size_t i = 0; i < dirty_per_round; ++i) {
      // Never page 0 (the sentinel whose frame "ready" printed).
      std::size_t p = 1 + static_cast<std::size_t>(splitmix64(pick_state) % (pages - 1));
      ++gen[p];
      fill_page(words + p * kWordsPerPage, s.seed, p, gen[p]);
    }
    sleep_ms(s.interval_ms);
  }
}
