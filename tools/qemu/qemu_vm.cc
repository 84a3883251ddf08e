#include "tools/qemu/qemu_vm.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>

#include "core/vmm_process.h"

namespace memsnap::qemu {
namespace {

using Clock = std::chrono::steady_clock;
using nlohmann::json;

constexpr const char* kRamName = "memsnap-guest";
constexpr const char* kStateFdName = "memsnap-state";
// The largest max-bandwidth (bytes/s) QEMU accepts on every host: no throttle at all.
constexpr std::int64_t kUnthrottledBytesPerSecond = (INT64_MAX >> 20) << 20;
constexpr int kRamFdInQemu = 3;

Error errno_error(const std::string& what) {
  const int err = errno;
  return make_error(Errc::kIoError, what + ": " + std::strerror(err), err);
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

}  // namespace

std::string default_append(const std::string& extra) {
  // The host's TSC frequency, so the guest does not calibrate it (it sometimes hung doing so).
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line;
  long khz = 0;
  while (std::getline(cpuinfo, line)) {
    if (line.rfind("cpu MHz", 0) == 0) {
      const auto colon = line.find(':');
      if (colon != std::string::npos) khz = std::lround(std::stod(line.substr(colon + 1)) * 1000);
      break;
    }
  }
  std::string append = "console=ttyS0 loglevel=3 reboot=t panic=-1";
  if (khz > 0) append += " tsc_early_khz=" + std::to_string(khz);
  if (!extra.empty()) append += " " + extra;
  return append;
}

Result<io::UniqueFd> create_guest_ram(std::uint64_t size) {
  io::UniqueFd fd(::memfd_create(kRamName, MFD_CLOEXEC));
  if (fd.get() < 0) return errno_error("memfd_create");
  if (::ftruncate(fd.get(), static_cast<off_t>(size)) != 0) return errno_error("ftruncate memfd");
  return fd;
}

Result<std::unique_ptr<QemuVm>> QemuVm::start(const Machine& machine, io::UniqueFd ram,
                                              bool incoming) {
  static std::atomic<int> instances{0};
  if (machine.memsnap_owns_ram != (ram.get() >= 0)) {
    return make_error(Errc::kInvalidArgument, machine.memsnap_owns_ram
                                                  ? "memsnap owns this machine's RAM: give a memfd"
                                                  : "QEMU owns this machine's RAM: give no memfd");
  }
  std::unique_ptr<QemuVm> vm(new QemuVm());
  vm->machine_ = machine;
  vm->ram_ = std::move(ram);
  const std::string stem = machine.work_dir + "/qemu-" + std::to_string(::getpid()) + "-" +
                           std::to_string(instances.fetch_add(1));
  vm->qmp_socket_ = stem + ".qmp";
  vm->console_ = stem + ".console";
  vm->log_ = stem + ".log";
  const std::string mib = std::to_string(machine.memory_bytes >> 20);
  const std::string bytes = std::to_string(machine.memory_bytes);
  std::vector<std::string> argv = {machine.binary,
                                   "-M",
                                   "microvm,memory-backend=mem",
                                   "-accel",
                                   machine.accel,
                                   "-m",
                                   mib + "M",
                                   "-nodefaults",
                                   "-no-user-config",
                                   "-display",
                                   "none",
                                   "-no-reboot",
                                   "-serial",
                                   "file:" + vm->console_,
                                   "-kernel",
                                   machine.kernel,
                                   "-initrd",
                                   machine.initrd,
                                   "-append",
                                   machine.append,
                                   "-qmp",
                                   "unix:" + vm->qmp_socket_ + ",server=on,wait=off",
                                   "-object",
                                   machine.memsnap_owns_ram
                                       ? "memory-backend-file,id=mem,size=" + bytes +
                                             ",mem-path=/proc/self/fd/" +
                                             std::to_string(kRamFdInQemu) + ",share=on"
                                       : "memory-backend-memfd,id=mem,size=" + bytes + ",share=on"};
  if (incoming) {
    for (const char* a : {"-incoming", "defer", "-S"}) argv.emplace_back(a);
  }
  // Resolved before fork: the child only calls async-signal-safe functions.
  if (argv[0].find('/') == std::string::npos) {
    const char* path = std::getenv("PATH");
    std::istringstream dirs(path != nullptr ? path : "/usr/bin:/bin");
    for (std::string dir; std::getline(dirs, dir, ':');) {
      const std::string candidate = dir + "/" + argv[0];
      if (::access(candidate.c_str(), X_OK) == 0) {
        argv[0] = candidate;
        break;
      }
    }
  }
  if (::access(argv[0].c_str(), X_OK) != 0) {
    return make_error(Errc::kNotFound, "no QEMU executable " + machine.binary +
                                           " (tools/setup.sh installs qemu-system-x86)");
  }
  std::vector<char*> cargv;
  for (std::string& a : argv) cargv.push_back(a.data());
  cargv.push_back(nullptr);

  io::UniqueFd log(::open(vm->log_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
  if (log.get() < 0) return errno_error("open " + vm->log_);
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid < 0) return errno_error("fork");
  if (pid == 0) {
    // The child: only async-signal-safe calls until exec.
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(126);
    ::dup2(log.get(), STDOUT_FILENO);
    ::dup2(log.get(), STDERR_FILENO);
    const int null = ::open("/dev/null", O_RDONLY);
    if (null >= 0) ::dup2(null, STDIN_FILENO);
    if (vm->ram_.get() >= 0) {
      if (vm->ram_.get() == kRamFdInQemu) {
        ::fcntl(kRamFdInQemu, F_SETFD, 0);
      } else if (::dup2(vm->ram_.get(), kRamFdInQemu) < 0) {
        ::_exit(125);
      }
    }
    ::execv(cargv[0], cargv.data());
    const char msg[] = "memsnap: cannot execute QEMU\n";
    (void)!::write(STDERR_FILENO, msg, sizeof(msg) - 1);
    ::_exit(127);
  }
  vm->pid_ = pid;
  auto qmp =
      QmpClient::connect(vm->qmp_socket_, machine.start_timeout, [&vm] { return vm->alive(); });
  if (!qmp.ok()) {
    Error e = std::move(qmp).error();
    e.message += "; QEMU said: " + vm->log_tail();
    vm->terminate();
    return e;
  }
  vm->qmp_.emplace(std::move(*qmp));
  return vm;
}

QemuVm::~QemuVm() { terminate(); }

bool QemuVm::alive() {
  if (pid_ <= 0) return false;
  int status = 0;
  const pid_t r = ::waitpid(pid_, &status, WNOHANG);
  if (r == pid_) {
    wait_status_ = status;
    pid_ = -pid_;  // reaped: keep the number (negated) for messages
    return false;
  }
  return r == 0;
}

void QemuVm::terminate() {
  qmp_.reset();
  if (pid_ > 0) {
    ::kill(pid_, SIGKILL);
    while (::waitpid(pid_, nullptr, 0) < 0 && errno == EINTR) {
    }
    pid_ = -pid_;
  }
  ::unlink(qmp_socket_.c_str());
}

std::string QemuVm::log_tail() const {
  std::string text = read_file(log_);
  if (text.size() > 2000) text = "..." + text.substr(text.size() - 2000);
  while (!text.empty() && (text.back() == '\n' || text.back() == '\r')) text.pop_back();
  return text.empty() ? "(nothing)" : text;
}

std::string QemuVm::state_text() {
  if (alive()) return "running (pid " + std::to_string(pid_) + ")";
  if (wait_status_ < 0) return "ended by memsnap";
  if (WIFEXITED(wait_status_)) {
    return "exited with status " + std::to_string(WEXITSTATUS(wait_status_));
  }
  if (WIFSIGNALED(wait_status_)) {
    return "killed by signal " + std::to_string(WTERMSIG(wait_status_));
  }
  return "gone";
}

std::vector<std::string> QemuVm::console_lines() const {
  std::vector<std::string> lines;
  const std::string text = read_file(console_);
  std::size_t start = 0;
  for (std::size_t nl; (nl = text.find('\n', start)) != std::string::npos; start = nl + 1) {
    std::string line = text.substr(start, nl - start);
    if (!line.empty() && line.back() == '\r') line.pop_back();
    lines.push_back(std::move(line));
  }
  return lines;
}

Result<json> QemuVm::qmp(const std::string& command, const json& arguments) {
  if (!qmp_) return make_error(Errc::kProcessGone, "QEMU is not running");
  return qmp_->execute(command, arguments);
}

Result<GuestMemoryAccess> QemuVm::guest_memory() {
  if (pid_ <= 0) return make_error(Errc::kProcessGone, "QEMU is not running");
  MEMSNAP_ASSIGN_OR_RETURN(
      auto memfds,
      find_memfds_of_process(
          pid_, machine_.memsnap_owns_ram ? std::optional<std::string>(kRamName) : std::nullopt));
  const ProcessMemfd* ram = nullptr;
  for (const ProcessMemfd& m : memfds) {
    if (m.size == machine_.memory_bytes && !m.mappings.empty()) ram = &m;
  }
  if (ram == nullptr) {
    return make_error(Errc::kNotFound, "QEMU pid " + std::to_string(pid_) + " maps no memfd of " +
                                           std::to_string(machine_.memory_bytes) + " bytes");
  }
  GuestMemoryAccess access;
  access.pid = pid_;
  access.regions = ram->mappings;
  access.guest_size = machine_.memory_bytes;
  if (ram_.get() >= 0) {
    access.memfd = ram_.get();
  } else {
    if (taken_.get() < 0) {
      MEMSNAP_ASSIGN_OR_RETURN(auto fd, take_fd_of_process(pid_, ram->fd_number));
      taken_.reset(fd);
    }
    access.memfd = taken_.get();
  }
  return access;
}

Status QemuVm::stop() {
  auto r = qmp("stop");
  if (!r.ok()) return r.error();
  return {};
}

Status QemuVm::run() {
  auto r = qmp("cont");
  if (!r.ok()) return r.error();
  return {};
}

Status QemuVm::migrate_file(const std::string& path, bool incoming, bool ignore_shared) {
  io::UniqueFd file(incoming ? ::open(path.c_str(), O_RDONLY | O_CLOEXEC)
                             : ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600));
  if (file.get() < 0) return errno_error("open " + path);
  if (!qmp_) return make_error(Errc::kProcessGone, "QEMU is not running");
  if (auto r = qmp_->execute("getfd", {{"fdname", kStateFdName}}, file.get()); !r.ok()) {
    return r.error();
  }
  // With x-ignore-shared, RAM (shared memory) is skipped: memsnap moves it.
  const json caps = {
      {"capabilities", {{{"capability", "x-ignore-shared"}, {"state", ignore_shared}}}}};
  if (auto r = qmp("migrate-set-capabilities", caps); !r.ok()) return r.error();
  if (!incoming) {
    // max-bandwidth defaults to a throttle for live migration over a network (128 MiB/s in
    // QEMU 7.2); a save to a local file lifts it, as libvirt's `virsh save` does. Both the
    // reference (the whole guest) and memsnap's device state are saved so.
    const json params = {{"max-bandwidth", kUnthrottledBytesPerSecond}};
    if (auto r = qmp("migrate-set-parameters", params); !r.ok()) return r.error();
  }
  const std::string uri = std::string("fd:") + kStateFdName;
  if (auto r = incoming ? qmp("migrate-incoming", {{"uri", uri}}) : qmp("migrate", {{"uri", uri}});
      !r.ok()) {
    return r.error();
  }
  const auto deadline = Clock::now() + std::chrono::seconds(60);
  for (;;) {
    auto info = qmp("query-migrate");
    if (!info.ok()) return info.error();
    const std::string status = info->value("status", std::string());
    if (status == "completed") break;
    if (status == "failed" || status == "cancelled") {
      return make_error(Errc::kInternal, std::string(incoming ? "loading" : "saving") +
                                             " the migration stream " + status + ": " +
                                             info->value("error-desc", std::string("?")));
    }
    if (Clock::now() >= deadline) {
      return make_error(Errc::kTimeout, "migration still " + status + " after 60 s");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  if (!incoming) return {};
  // The loaded VM becomes "paused" (it was started with -S) once QEMU has finished the load.
  for (;;) {
    auto s = qmp("query-status");
    if (!s.ok()) return s.error();
    const std::string status = s->value("status", std::string());
    if (status == "paused" || status == "prelaunch") return {};
    if (status != "inmigrate") {
      return make_error(Errc::kInternal, "after loading the device state QEMU is " + status);
    }
    if (Clock::now() >= deadline) {
      return make_error(Errc::kTimeout, "QEMU still in migration 60 s after the load");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

Status QemuVm::save_device_state(const std::string& path) {
  return migrate_file(path, false, true);
}

Status QemuVm::load_device_state(const std::string& path) { return migrate_file(path, true, true); }

Status QemuVm::migrate_to_file(const std::string& path) { return migrate_file(path, false, false); }

Status QemuVm::load_from_file(const std::string& path) { return migrate_file(path, true, false); }

io::UniqueFd QemuVm::release_ram() { return std::move(ram_); }

Result<std::unique_ptr<VmmAdapter>> Launcher::start_incoming(io::UniqueFd ram) {
  MEMSNAP_ASSIGN_OR_RETURN(auto vm, QemuVm::start(machine_, std::move(ram), true));
  return std::unique_ptr<VmmAdapter>(std::move(vm));
}

}  // namespace memsnap::qemu
