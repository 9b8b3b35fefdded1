// main() of the GoogleTest binaries run under mpirun: MPI up (Control), then every test on
// every rank (so the collectives stay matched); only rank 0 reports.
#include <gtest/gtest.h>

#include "comm/control.h"

int main(int argc, char** argv) {
  reattn::Expected<reattn::Control> control = reattn::Control::init(&argc, &argv);
  if (!control) return 3;
  ::testing::InitGoogleTest(&argc, argv);
  if (control->rank() != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
  return RUN_ALL_TESTS();
}
