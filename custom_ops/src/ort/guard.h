// The API boundary: run a callable and turn anything it throws into an OrtStatus, so that no C++ exception ever
// crosses into onnxruntime. Validation failures become INVALID_ARGUMENT.
#pragma once

#include <new>
#include <string>

#include "checks.h"

namespace mamba_export_ops {

template <typename F>
OrtStatusPtr guarded(F&& body) noexcept {
  const OrtApi& api = Ort::GetApi();
  try {
    body();
    return nullptr;
  } catch (const InvalidInput& e) {
    return api.CreateStatus(ORT_INVALID_ARGUMENT, e.what());
  } catch (const Ort::Exception& e) {
    return api.CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::bad_alloc&) {
    return api.CreateStatus(ORT_FAIL, "mamba_export_ops: out of memory");
  } catch (const std::exception& e) {
    return api.CreateStatus(ORT_FAIL, (std::string("mamba_export_ops: ") + e.what()).c_str());
  } catch (...) {
    return api.CreateStatus(ORT_FAIL, "mamba_export_ops: unknown error");
  }
}

}  // namespace mamba_export_ops
