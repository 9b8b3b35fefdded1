// Picks the data plane for a backend: MPI for host-memory backends (cpu), NCCL for cuda.
#pragma once

#include <memory>

#include "comm/communicator.h"
#include "comm/control.h"
#include "kernels/backend.h"

namespace reattn {

// Every rank calls it together (the NCCL bootstrap is collective). The backend must outlive
// the communicator.
Expected<std::unique_ptr<Communicator>> make_communicator(Backend& backend, const Control& control);

}  // namespace reattn
