// What the main() of every MPI program shares (reattn-run, the benchmarks, the GPU tests): MPI
// up through Control::init, the command line parsed on every rank, a run's Status as the exit code.
#pragma once

#include <CLI/CLI.hpp>

#include <cstdio>
#include <optional>

#include "comm/control.h"

namespace reattn {

// Control::init, then body(control, argc, argv) (argv as MPI leaves it) as the exit code; a
// failed start is printed as "<program>: error: <why>" and exits 3.
template <typename Body>
int mpi_main(const char* program, int argc, char** argv, Body body) {
  Expected<Control> control = Control::init(&argc, &argv);
  if (!control) {
    std::fprintf(stderr, "%s: error: %s\n", program, control.status().to_string().c_str());
    return 3;
  }
  return body(*control, argc, argv);
}

// Parses the command line on every rank: std::nullopt when it parsed, else the exit code (CLI11's:
// 0 for --help), the message printed by rank 0 only.
inline std::optional<int> parse_command_line(CLI::App& app, int argc, char** argv, const Control& control) {
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return control.rank() == 0 ? app.exit(e) : e.get_exit_code();
  }
  return std::nullopt;
}

// A run's Status as the exit code: 0, or 1 with "<program>: rank <r>: <status>" on stderr.
inline int exit_code(const char* program, const Control& control, const Status& status) {
  if (status.is_ok()) return 0;
  std::fprintf(stderr, "%s: rank %d: %s\n", program, control.rank(), status.to_string().c_str());
  return 1;
}

}  // namespace reattn
