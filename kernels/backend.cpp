#include "kernels/backend.h"

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

}  // namespace reattn
