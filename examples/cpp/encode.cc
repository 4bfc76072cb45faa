// mlc-vision C++ loader: what a chat runtime does with a compiled vision encoder.
//
//   encode LIB PARAMS_DIR INPUT OUTPUT.npy [--device cpu|cuda|metal|vulkan[:N]] [--entry encode|encode_rgb8]
//
// Links only the TVM runtime (libtvm_runtime + libtvm_ffi from the apache-tvm wheel).
// LIB is a library from `mlc-vision compile`; PARAMS_DIR is a params directory from
// `mlc-vision convert` (TVM's tensor-cache format). INPUT is a .npy file (float32
// [batch, 3, H, W] normalized pixels for `encode`, uint8 [batch, H, W, 3] for
// `encode_rgb8`) or a raw file of float32 values (batch inferred from its size).
// Everything else (image size, parameter names, tokens per image, output width)
// comes from the library's _metadata().

#include <dlpack/dlpack.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/extra/json.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>

#include <cstdint>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;
using ffi::Tensor;

namespace {

constexpr int kPooledAllocator = 2;  // relax.VirtualMachine.POOLED_ALLOCATOR

struct Array {
  std::vector<int64_t> shape;
  std::string dtype;  // "float32" or "uint8"
  std::vector<char> bytes;
};

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  std::ostringstream data;
  data << in.rdbuf();
  return data.str();
}

// Minimal .npy (version 1/2, C order) reader for float32 and uint8.
Array ReadNpy(const std::string& path, const std::string& raw) {
  uint8_t major = static_cast<uint8_t>(raw[6]);
  size_t header_len_size = major == 1 ? 2 : 4;
  size_t header_len = 0;
  for (size_t i = 0; i < header_len_size; ++i) {
    header_len |= static_cast<size_t>(static_cast<uint8_t>(raw[8 + i])) << (8 * i);
  }
  size_t data_start = 8 + header_len_size + header_len;
  std::string header = raw.substr(8 + header_len_size, header_len);
  Array out;
  if (header.find("'<f4'") != std::string::npos) {
    out.dtype = "float32";
  } else if (header.find("'|u1'") != std::string::npos) {
    out.dtype = "uint8";
  } else {
    throw std::runtime_error(path + ": only float32 (<f4) and uint8 (|u1) .npy files are supported");
  }
  if (header.find("'fortran_order': True") != std::string::npos) {
    throw std::runtime_error(path + ": Fortran-ordered arrays are not supported");
  }
  size_t open = header.find('(', header.find("'shape'"));
  size_t close = header.find(')', open);
  std::stringstream dims(header.substr(open + 1, close - open - 1));
  std::string item;
  while (std::getline(dims, item, ',')) {
    if (item.find_first_not_of(' ') != std::string::npos) out.shape.push_back(std::stoll(item));
  }
  out.bytes.assign(raw.begin() + data_start, raw.end());
  return out;
}

void WriteNpy(const std::string& path, const std::vector<int64_t>& shape, const std::string& descr,
              const std::vector<char>& data) {
  std::ostringstream header;
  header << "{'descr': '" << descr << "', 'fortran_order': False, 'shape': (";
  for (size_t i = 0; i < shape.size(); ++i) header << shape[i] << (shape.size() == 1 || i + 1 < shape.size() ? ", " : "");
  header << "), }";
  std::string text = header.str();
  size_t total = 10 + text.size() + 1;
  text += std::string((64 - total % 64) % 64, ' ') + "\n";
  std::ofstream out(path, std::ios::binary);
  if (!out) throw std::runtime_error("cannot write " + path);
  out.write("\x93NUMPY\x01\x00", 8);
  uint16_t len = static_cast<uint16_t>(text.size());
  out.write(reinterpret_cast<const char*>(&len), 2);
  out.write(text.data(), text.size());
  out.write(data.data(), data.size());
}

DLDevice ParseDevice(const std::string& spec) {
  std::string kind = spec.substr(0, spec.find(':'));
  int index = spec.find(':') == std::string::npos ? 0 : std::stoi(spec.substr(spec.find(':') + 1));
  if (kind == "cpu") return {kDLCPU, index};
  if (kind == "cuda") return {kDLCUDA, index};
  if (kind == "metal") return {kDLMetal, index};
  if (kind == "vulkan") return {kDLVulkan, index};
  if (kind == "opencl") return {kDLOpenCL, index};
  throw std::runtime_error("unknown device " + spec);
}

DLDataType ParseDtype(const std::string& name) {
  if (name == "float32") return {kDLFloat, 32, 1};
  if (name == "float16") return {kDLFloat, 16, 1};
  if (name == "bfloat16") return {kDLBfloat, 16, 1};
  if (name == "uint8") return {kDLUInt, 8, 1};
  throw std::runtime_error("unsupported dtype " + name);
}

ffi::Function Get(const ffi::Module& mod, const std::string& name) {
  auto fn = mod->GetFunction(name);
  if (!fn.has_value()) throw std::runtime_error("library has no function " + name);
  return *fn;
}

ffi::Function Global(const std::string& name) {
  auto fn = ffi::Function::GetGlobal(name);
  if (!fn.has_value()) throw std::runtime_error("TVM runtime lacks " + name);
  return *fn;
}

// float32 input is converted to the library's dtype on the host when it differs.
std::vector<char> ToDtype(const Array& input, const std::string& dtype) {
  if (input.dtype == dtype) return input.bytes;
  if (input.dtype != "float32") throw std::runtime_error("input dtype " + input.dtype + " != library dtype " + dtype);
  size_t n = input.bytes.size() / 4;
  const float* src = reinterpret_cast<const float*>(input.bytes.data());
  std::vector<char> out(n * 2);
  uint16_t* dst = reinterpret_cast<uint16_t*>(out.data());
  for (size_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, &src[i], 4);
    if (dtype == "bfloat16") {
      dst[i] = static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);  // round to nearest even
    } else {  // float16, round to nearest (normal range; enough for normalized pixels)
      uint32_t sign = (bits >> 16) & 0x8000;
      int32_t exp = static_cast<int32_t>((bits >> 23) & 0xFF) - 127 + 15;
      uint32_t mant = bits & 0x7FFFFF;
      if (exp <= 0) {
        dst[i] = static_cast<uint16_t>(sign);
      } else if (exp >= 31) {
        dst[i] = static_cast<uint16_t>(sign | 0x7C00);
      } else {
        uint32_t half = sign | (exp << 10) | (mant >> 13);
        if ((mant & 0x1FFF) > 0x1000 || ((mant & 0x1FFF) == 0x1000 && (half & 1))) ++half;
        dst[i] = static_cast<uint16_t>(half);
      }
    }
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 5) {
    std::cerr << "usage: " << argv[0]
              << " LIB PARAMS_DIR INPUT(.npy|raw f32) OUTPUT.npy [--device cpu|cuda[:N]] [--entry encode|encode_rgb8]\n";
    return 2;
  }
  std::string lib_path = argv[1], params_dir = argv[2], input_path = argv[3], output_path = argv[4];
  std::string device_spec = "cpu", entry = "encode";
  for (int i = 5; i + 1 < argc; i += 2) {
    std::string flag = argv[i];
    if (flag == "--device") device_spec = argv[i + 1];
    else if (flag == "--entry") entry = argv[i + 1];
    else { std::cerr << "unknown option " << flag << "\n"; return 2; }
  }
  try {
    DLDevice device = ParseDevice(device_spec);
    // 1. Load the library and start its Relax VM on the device (the CPU hosts shape functions).
    ffi::Module lib = ffi::Module::LoadFromFile(lib_path);
    ffi::Module vm = Get(lib, "vm_load_executable")().cast<ffi::Module>();
    Get(vm, "vm_initialization")(static_cast<int>(device.device_type), device.device_id, kPooledAllocator,
                                 static_cast<int>(kDLCPU), 0, kPooledAllocator);

    // 2. Read what the library says about itself.
    ffi::String metadata_json = Get(vm, "_metadata")().cast<ffi::String>();
    ffi::json::Object meta = ffi::json::Parse(metadata_json).cast<ffi::json::Object>();
    std::string dtype = meta["dtype"].cast<ffi::String>();
    int64_t image_size = meta["image_size"].cast<int64_t>();
    // The token layout: prefix (class/register) tokens, the patch grid (rows x cols), what encode returns.
    ffi::json::Object layout = meta["tokens"].cast<ffi::json::Object>();
    int64_t tokens = layout["output"].cast<int64_t>();
    ffi::json::Array grid = layout["grid"].cast<ffi::json::Array>();
    int64_t width = meta["output_width"].cast<int64_t>();
    ffi::Array<ffi::String> names;
    for (const ffi::Any& p : meta["params"].cast<ffi::json::Array>()) {
      names.push_back(p.cast<ffi::json::Object>()["name"].cast<ffi::String>());
    }

    // 3. Parameters: TVM's own tensor-cache loader, picked by the names the library lists.
    Global("vm.builtin.tensor_cache.load")(params_dir, static_cast<int>(device.device_type), device.device_id);
    ffi::Array<Tensor> params = Global("vm.builtin.param_array_from_cache_by_name")(names).cast<ffi::Array<Tensor>>();

    // 4. The input, checked against the library's geometry.
    std::string raw = ReadFile(input_path);
    Array input;
    if (raw.rfind("\x93NUMPY", 0) == 0) {
      input = ReadNpy(input_path, raw);
    } else {
      int64_t per_image = 3 * image_size * image_size * 4;
      if (raw.size() % per_image) throw std::runtime_error(input_path + ": raw size is not a multiple of one image");
      input = {{static_cast<int64_t>(raw.size() / per_image), 3, image_size, image_size}, "float32",
               std::vector<char>(raw.begin(), raw.end())};
    }
    bool rgb8 = entry == "encode_rgb8";
    std::vector<int64_t> want = rgb8 ? std::vector<int64_t>{input.shape[0], image_size, image_size, 3}
                                     : std::vector<int64_t>{input.shape[0], 3, image_size, image_size};
    if (input.shape != want) throw std::runtime_error(input_path + ": shape does not match the library's input");
    std::string in_dtype = rgb8 ? "uint8" : dtype;
    std::vector<char> in_bytes = ToDtype(input, in_dtype);
    // The runtime's own allocation and copy functions (the wheel ships no C++ headers for them).
    Tensor pixels = Global("runtime.TVMTensorAllocWithScope")(ffi::Shape(input.shape), ParseDtype(in_dtype), device,
                                                              ffi::Optional<ffi::String>())
                        .cast<Tensor>();
    Global("runtime.TVMTensorCopyFromBytes")(pixels, static_cast<void*>(in_bytes.data()),
                                             static_cast<int64_t>(in_bytes.size()));

    // 5. Run and copy the features back: [batch, tokens, width] in the library's dtype.
    Tensor features = Get(vm, entry)(pixels, params).cast<Tensor>();
    const DLTensor* result = features.GetDLTensorPtr();
    std::vector<int64_t> out_shape(result->shape, result->shape + result->ndim);
    size_t nbytes = 1;
    for (int64_t d : out_shape) nbytes *= d;
    nbytes *= (result->dtype.bits / 8);
    std::vector<char> out(nbytes);
    Global("runtime.TVMTensorCopyToBytes")(features, static_cast<void*>(out.data()), static_cast<int64_t>(nbytes));
    std::string descr = dtype == "float32" ? "<f4" : dtype == "float16" ? "<f2" : "<u2";  // bf16 as raw uint16
    WriteNpy(output_path, out_shape, descr, out);
    if (out_shape.size() != 3 || out_shape[1] != tokens || out_shape[2] != width) {
      throw std::runtime_error("the library's output does not match its metadata's token layout");
    }
    std::cout << "features [" << out_shape[0] << ", " << tokens << ", " << width << "] " << dtype << " (grid "
              << grid[0].cast<int64_t>() << "x" << grid[1].cast<int64_t>() << ", " << layout["prefix"].cast<int64_t>()
              << " prefix tokens) -> " << output_path << "\n";
  } catch (const std::exception& err) {
    std::cerr << "error: " << err.what() << "\n";
    return 1;
  }
  return 0;
}
