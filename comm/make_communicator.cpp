#include "comm/make_communicator.h"

#include <string>

#include "comm/mpi_communicator.h"
#if defined(REATTN_HAVE_CUDA)
#include "comm/nccl_communicator.h"
#endif

namespace reattn {

Expected<std::unique_ptr<Communicator>> make_communicator(Backend& backend, const Control& control) {
  const double step_s = control.deadlines().step_s;
  if (backend.host_memory()) return std::unique_ptr<Communicator>(new MpiCommunicator(step_s));
#if defined(REATTN_HAVE_CUDA)
  if (auto* cuda = dynamic_cast<CudaBackend*>(&backend)) {
    Expected<std::unique_ptr<NcclCommunicator>> nccl =
        NcclCommunicator::make(*cuda, control.rank(), control.world(), control.deadlines());
    if (!nccl) return nccl.status();
    return std::unique_ptr<Communicator>(std::move(nccl).value());
  }
#else
  (void)control;
#endif
  return internal_error(std::string("no communicator for device-memory backend '") + backend.name() + "'");
}

}  // namespace reattn
