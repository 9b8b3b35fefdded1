#include "kernels/backend.h"

#include <cstdint>
#include <string>

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

Status check_upload_pieces(size_t bytes, const UploadPiece* pieces, int64_t count) {
  if (count < 0) return invalid_argument("upload_pieces: count " + std::to_string(count) + " is negative");
  if (count > 0 && !pieces) return invalid_argument("upload_pieces: null piece list");
  for (int64_t i = 0; i < count; ++i) {
    const UploadPiece& p = pieces[i];
    if (!p.dst || p.src_offset < 0 || p.bytes < 0 || static_cast<uint64_t>(p.src_offset) > bytes ||
        static_cast<uint64_t>(p.bytes) > bytes - static_cast<uint64_t>(p.src_offset)) {
      return invalid_argument("upload_pieces: piece " + std::to_string(i) + " (offset " + std::to_string(p.src_offset) +
                              ", " + std::to_string(p.bytes) + " bytes) is outside the " + std::to_string(bytes) +
                              "-byte source or has no destination");
    }
  }
  return Status::ok();
}

Status ensure_capacity(Backend& backend, Buffer& buffer, size_t bytes) {
  if (buffer.bytes() >= bytes && buffer.data()) return Status::ok();
  REATTN_ASSIGN_OR_RETURN(buffer, backend.allocate(bytes == 0 ? 1 : bytes));
  return Status::ok();
}

}  // namespace reattn
