// The library's entry point: onnxruntime calls RegisterCustomOps when a program registers the library.
#include <string>

#include "guard.h"
#include "mamba_export_ops/mamba_export_ops.h"
#include "op_registry.h"

namespace mamba_export_ops {
namespace {

// The domain with every op of this build. Created once per process and never released: session options keep a
// pointer to it, and sessions use it for as long as they live.
OrtCustomOpDomain* shared_domain() {
  static OrtCustomOpDomain* domain = [] {
    Ort::CustomOpDomain d(kDomain);
    for (const OrtCustomOp* op : cpu_ops()) d.Add(op);
#ifdef MAMBA_EXPORT_OPS_WITH_CUDA
    for (const OrtCustomOp* op : cuda_ops()) d.Add(op);
#endif
    return d.release();
  }();
  return domain;
}

}  // namespace
}  // namespace mamba_export_ops

OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    // CreateStatus is in every version of the API table, so version 1 can still report the problem.
    const std::string message = "libmamba_export_ops needs onnxruntime C API version " +
                                std::to_string(ORT_API_VERSION) + " (onnxruntime >= 1.21); this is onnxruntime " +
                                api_base->GetVersionString();
    return api_base->GetApi(1)->CreateStatus(ORT_FAIL, message.c_str());
  }
  Ort::InitApi(api);
  return mamba_export_ops::guarded([&] {
    Ort::ThrowOnError(api->AddCustomOpDomain(options, mamba_export_ops::shared_domain()));
  });
}
