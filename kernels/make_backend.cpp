#include "kernels/make_backend.h"

#include "kernels/cpu/cpu_backend.h"
#if defined(REATTN_HAVE_CUDA)
#include "kernels/cuda/cuda_backend.h"
#endif

namespace reattn {

Expected<std::unique_ptr<Backend>> make_backend(const Config& config, int local_rank) {
  BackendKind kind = config.backend.kind;
#if defined(REATTN_HAVE_CUDA)
  // auto: cuda when a GPU is visible and the CUDA kernels cover the config's shapes.
  if (kind == BackendKind::kAuto) {
    kind = cuda_device_count() > 0 && cuda_backend_supports(config).is_ok() ? BackendKind::kCuda : BackendKind::kCpu;
  }
  if (kind == BackendKind::kCuda) {
    REATTN_RETURN_IF_ERROR(cuda_backend_supports(config));
    return make_cuda_backend(config, local_rank);
  }
#else
  (void)local_rank;
  if (kind == BackendKind::kAuto) kind = BackendKind::kCpu;
  if (kind == BackendKind::kCuda) {
    return invalid_argument("backend.kind: 'cuda' was asked for, but this build has no CUDA backend "
                            "(configure with -DREATTN_CUDA=ON)");
  }
#endif
  return std::unique_ptr<Backend>(new CpuBackend(config.backend.threads));
}

}  // namespace reattn
