// The small ReAttention settings the semantics and planning tests share: 4 sinks, 8-token
// chunks, a 32-token window, top-2, at most 6 recalled chunks.
#pragma once

#include "common/config.h"

namespace reattn::test {

inline ReattentionConfig tiny_rc() {
  ReattentionConfig rc;
  rc.sink_tokens = 4;
  rc.local_window = 32;
  rc.chunk_tokens = 8;
  rc.top_k = 2;
  rc.max_recall_chunks = 6;
  return rc;
}

}  // namespace reattn::test
