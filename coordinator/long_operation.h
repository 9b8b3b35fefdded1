// A long-running operation (a bulk load, a snapshot, a restore) as the rank-0 step loop runs
// it: a sequence of ordinary protocol Operations ("slices", each bounded in work), submitted
// to the ranks one at a time between query steps, so queries on other contexts keep being
// answered while it runs. The step loop drives it:
//
//   start(registry)            once, when its task reaches the front of the queue; not ok: failed
//   loop: next_slice()         nullopt: done, succeeded (a cancel after the last slice is too late)
//         cancel requested? -> rollback
//         ranks submit it, then on_slice_done(slice, result, registry); not ok: failed -> rollback
//   rollback: every Operation of rollback() is submitted in order, then on_rolled_back(registry)
//
// The operation's record (coordinator/operations.h) is kept by the step loop: state, times,
// progress() after every slice, the error. While the operation is unfinished its context is
// busy: appends, layer steps, deletes and other operations on it get 409 naming the
// operation, and queries too when refuses_queries().
// Thread-safety: every method is called from the step loop's thread only.
#pragma once

#include <optional>
#include <vector>

#include "common/protocol.h"
#include "coordinator/operations.h"
#include "coordinator/registry.h"

namespace reattn {

class LongOperation {
 public:
  virtual ~LongOperation() = default;

  virtual OperationKind kind() const = 0;
  // Whether queries on the context are refused while it runs (its contents are partial).
  virtual bool refuses_queries() const { return kind() != OperationKind::kSnapshot; }

  // Checks against the registry as it is now (the request was checked when it arrived, but
  // the context may have changed since). Not ok: the operation fails without running a slice.
  virtual Status start(Registry& registry) = 0;
  // The next slice to run on every rank, or nullopt when the operation is complete. No side
  // effects: the step loop may ask and then cancel instead.
  virtual std::optional<Operation> next_slice() = 0;
  // The ranks' agreed result of `slice`. Update the registry and progress here. A non-ok
  // return fails the operation (its message becomes the record's error) and rolls it back.
  virtual Status on_slice_done(const Operation& slice, const OperationResult& result, Registry& registry) = 0;
  virtual OperationProgress progress() const = 0;

  // Operations that undo every slice run so far, in order (empty when there is nothing to
  // undo); after a failure or a cancel. A failed rollback operation is a fault of the service.
  virtual std::vector<Operation> rollback() = 0;
  // After the rollback operations went through: put the registry back as it was.
  virtual void on_rolled_back(Registry& registry) { (void)registry; }
};

}  // namespace reattn
