// reattn-copy-probe: the host copy ceilings a layer step's bytes move against, measured on the
// machine itself: one thread's memcpy between two warm buffers, and (with 2+ ranks) rank 0's
// MPI point-to-point send to rank 1 over the transport MPI picked, as the control plane's
// broadcast sends an operation. Prints one JSON object on rank 0.
//   mpirun -np 2 build/reattn-copy-probe --mib 64 --reps 10
#include <mpi.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <vector>

namespace {

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, world = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  CLI::App app("reattn-copy-probe: host memcpy and MPI point-to-point bandwidth");
  int mib = 64, reps = 10;
  app.add_option("--mib", mib, "bytes per copy or message, MiB")->check(CLI::Range(1, 1024));
  app.add_option("--reps", reps, "timed repetitions (after one warm-up)")->check(CLI::Range(1, 1000));
  CLI11_PARSE(app, argc, argv);
  const size_t bytes = static_cast<size_t>(mib) << 20;
  std::vector<char> a(bytes, 1), b(bytes, 2);

  double memcpy_s = 1e30;
  for (int i = 0; i <= reps; ++i) {
    const auto t = std::chrono::steady_clock::now();
    std::memcpy(b.data(), a.data(), bytes);
    if (i > 0) memcpy_s = std::min(memcpy_s, seconds_since(t));
  }
  double mpi_s = 0;
  if (world > 1 && rank < 2) {
    std::vector<double> times;
    for (int i = 0; i <= reps; ++i) {
      MPI_Barrier(MPI_COMM_WORLD);
      const auto t = std::chrono::steady_clock::now();
      if (rank == 0) {
        MPI_Send(a.data(), static_cast<int>(bytes), MPI_BYTE, 1, 1, MPI_COMM_WORLD);
        char ack = 0;
        MPI_Recv(&ack, 1, MPI_BYTE, 1, 2, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
      } else {
        MPI_Recv(b.data(), static_cast<int>(bytes), MPI_BYTE, 0, 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        char ack = 1;
        MPI_Send(&ack, 1, MPI_BYTE, 0, 2, MPI_COMM_WORLD);
      }
      if (i > 0) times.push_back(seconds_since(t));
    }
    std::sort(times.begin(), times.end());
    mpi_s = times[times.size() / 2];
  } else if (world > 1) {
    for (int i = 0; i <= reps; ++i) MPI_Barrier(MPI_COMM_WORLD);
  }
  if (rank == 0) {
    const double gb = static_cast<double>(bytes) / 1e9;
    std::printf("{\"probe\":\"copy\",\"mib\":%d,\"reps\":%d,\"memcpy_gb_s\":%.2f", mib, reps, gb / memcpy_s);
    if (world > 1) std::printf(",\"mpi_p2p_ms\":%.2f,\"mpi_p2p_gb_s\":%.2f", mpi_s * 1e3, gb / mpi_s);
    std::printf("}\n");
  }
  MPI_Finalize();
  return 0;
}
