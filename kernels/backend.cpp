#include "kernels/backend.h"

#include "kernels/cpu/cpu_backend.h"
#if defined(REATTN_HAVE_CUDA)
#include "kernels/cuda/cuda_backend.h"
#endif

namespace reattn {

Buffer& Buffer::operator=(Buffer&& other) noexcept {
  if (this != &other) {
    if (owner_ && data_) owner_->release(data_);
    owner_ = other.owner_;
    data_ = other.data_;
    bytes_ = other.bytes_;
    other.owner_ = nullptr;
    other.data_ = nullptr;
    other.bytes_ = 0;
  }
  return *this;
}

Buffer::~Buffer() {
  if (owner_ && data_) owner_->release(data_);
}

Status ensure_capacity(Backend& backend, Buffer& buffer, size_t bytes) {
  if (buffer.bytes() >= bytes && buffer.data()) return Status::ok();
  REATTN_ASSIGN_OR_RETURN(buffer, backend.allocate(bytes == 0 ? 1 : bytes));
  return Status::ok();
}

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
