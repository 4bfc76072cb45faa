// mlc-vision C++ loader: what a chat runtime does with a compiled vision encoder.
//
//   encode LIB PARAMS_DIR INPUT OUTPUT.npy [--device cpu|cuda|metal|vulkan[:N]] [--entry encode|encode_rgb8]
//   encode LIB PARAMS_DIR IMAGE.npy OUTPUT.npy --tiles [--max-tiles N] [--min-tiles M] [--no-thumbnail]
//          [--tiles-out TILES.npy] [--device ...]
//
// Links only the TVM runtime (libtvm_runtime + libtvm_ffi from the apache-tvm wheel).
// LIB is a library from `mlc-vision compile`; PARAMS_DIR is a params directory from
// `mlc-vision convert` (TVM's tensor-cache format). INPUT is a .npy file (float32
// [batch, 3, H, W] normalized pixels for `encode`, uint8 [batch, H, W, 3] for
// `encode_rgb8`) or a raw file of float32 values (batch inferred from its size).
// Everything else (image size, parameter names, tokens per image, output width)
// comes from the library's _metadata(). A library with several outputs (InternVL-14B: features,
// then query_outputs) writes the features to OUTPUT.npy and each other output to OUTPUT.<name>.npy.
//
// --tiles follows the library's tiling contract (tiling.h, docs/tiling.md): IMAGE.npy is one
// uint8 [H, W, 3] image of any size; it is cut into tiles (InternVL: the grid, then the
// thumbnail; LLaVA-NeXT anyres: the base image, then the grid), the tiles run through
// encode_rgb8, and OUTPUT gets [tiles, tokens, width] (InternVL) or the packed sequence
// [tokens, width] the language model reads (anyres: unpadded, image_newline after each row).

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
#include <optional>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "tiling.h"

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

// The metadata's "prepack" (fp32 CPU libraries: their linear layers' weights packed once), absent or null elsewhere.
std::optional<ffi::json::Object> Prepack(const ffi::json::Object& meta) {
  if (meta.count("prepack") == 0) return std::nullopt;
  return meta["prepack"].try_cast<ffi::json::Object>();
}

// The params the entries are called with: packed once by the library's prepack_params where it has one.
ffi::Array<Tensor> PrepackedParams(const ffi::Module& vm, const ffi::json::Object& meta, ffi::Array<Tensor> params) {
  std::optional<ffi::json::Object> prepack = Prepack(meta);
  if (!prepack) return params;
  return Get(vm, (*prepack)["function"].cast<ffi::String>())(params).cast<ffi::Array<Tensor>>();
}

// The function computing ``entry`` on those params: its _prepacked twin where the library packs its weights.
ffi::Function Entry(const ffi::Module& vm, const ffi::json::Object& meta, const std::string& entry) {
  std::optional<ffi::json::Object> prepack = Prepack(meta);
  if (!prepack) return Get(vm, entry);
  return Get(vm, (*prepack)["entries"].cast<ffi::json::Object>()[entry].cast<ffi::String>());
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

size_t DtypeBytes(const std::string& dtype) { return dtype == "float32" ? 4 : dtype == "uint8" ? 1 : 2; }

std::string NpyDescr(const std::string& dtype) {
  return dtype == "float32" ? "<f4" : dtype == "float16" ? "<f2" : "<u2";  // bf16 as raw uint16
}

Tensor ToDevice(const std::vector<int64_t>& shape, const std::string& dtype, std::vector<char>& bytes, DLDevice device) {
  // The runtime's own allocation and copy functions (the wheel ships no C++ headers for them).
  Tensor t = Global("runtime.TVMTensorAllocWithScope")(ffi::Shape(shape), ParseDtype(dtype), device,
                                                       ffi::Optional<ffi::String>())
                 .cast<Tensor>();
  Global("runtime.TVMTensorCopyFromBytes")(t, static_cast<void*>(bytes.data()), static_cast<int64_t>(bytes.size()));
  return t;
}

std::vector<char> ToHost(const Tensor& t, std::vector<int64_t>* shape) {
  const DLTensor* dl = t.GetDLTensorPtr();
  shape->assign(dl->shape, dl->shape + dl->ndim);
  size_t nbytes = dl->dtype.bits / 8;
  for (int64_t d : *shape) nbytes *= d;
  std::vector<char> out(nbytes);
  Global("runtime.TVMTensorCopyToBytes")(t, static_cast<void*>(out.data()), static_cast<int64_t>(nbytes));
  return out;
}

// anyres packing of raw features: float32 as floats (OneVision's shrink computes), other dtypes as
// bytes (packing only copies them).
std::vector<char> Pack(const std::vector<char>& features, const std::vector<char>& newline, int tokens, int width,
                       const std::string& dtype, const mlc_vision::Grid& grid, int height, int image_width,
                       int anyres_max) {
  if (dtype == "float32") {
    std::vector<float> f(features.size() / 4), n(newline.size() / 4);
    std::memcpy(f.data(), features.data(), features.size());
    std::memcpy(n.data(), newline.data(), newline.size());
    std::vector<float> packed = mlc_vision::PackAnyres(f, tokens, width, grid, height, image_width, &n, anyres_max);
    std::vector<char> out(packed.size() * 4);
    std::memcpy(out.data(), packed.data(), out.size());
    return out;
  }
  int element = static_cast<int>(DtypeBytes(dtype));
  std::vector<uint8_t> f(features.begin(), features.end()), n(newline.begin(), newline.end());
  std::vector<uint8_t> packed =
      mlc_vision::PackAnyres(f, tokens, width * element, grid, height, image_width, &n, anyres_max);
  return std::vector<char>(packed.begin(), packed.end());
}

// The names of what `encode` returns (metadata entries.encode.outputs; older libraries: the features only).
std::vector<std::string> OutputNames(const ffi::json::Object& meta) {
  ffi::json::Object encode = meta["entries"].cast<ffi::json::Object>()["encode"].cast<ffi::json::Object>();
  if (encode.count("outputs") == 0) return {"features"};
  std::vector<std::string> names;
  for (const ffi::Any& o : encode["outputs"].cast<ffi::json::Array>()) {
    names.push_back(std::string(o.cast<ffi::json::Object>()["name"].cast<ffi::String>()));
  }
  return names;
}

// Where an output after the features goes: OUT.npy -> OUT.<name>.npy (what `mlc-vision run` writes).
std::string ExtraOutputPath(const std::string& output, const std::string& name) {
  const std::string suffix = ".npy";
  bool npy = output.size() >= suffix.size() && output.compare(output.size() - suffix.size(), suffix.size(), suffix) == 0;
  return (npy ? output.substr(0, output.size() - suffix.size()) : output) + "." + name + suffix;
}

struct TileOptions {
  std::optional<int> max_tiles, min_tiles;  // unset: the library's
  bool thumbnail = true;
  std::string tiles_out;
};

// --tiles: one image -> the library's tiles -> encode_rgb8 -> features (packed for anyres).
void EncodeTiles(const ffi::Module& vm, const ffi::json::Object& meta, const ffi::Array<Tensor>& params,
                 const Array& input, const TileOptions& opt, DLDevice device, const std::string& output_path) {
  if (!meta.count("tiling") || meta["tiling"] == nullptr) throw std::runtime_error("the library has no tiling contract");
  ffi::json::Object tiling = meta["tiling"].cast<ffi::json::Object>();
  std::string backend = meta["preprocess"].cast<ffi::json::Object>()["backend"].cast<ffi::String>();
  if (backend != "torchvision") {
    throw std::runtime_error("the library resizes with the '" + backend +
                             "' backend; this example implements the 'torchvision' one (ATen's integer bicubic)");
  }
  if (input.dtype != "uint8" || input.shape.size() != 3 || input.shape[2] != 3) {
    throw std::runtime_error("--tiles takes one uint8 [H, W, 3] image");
  }
  mlc_vision::Image image{static_cast<int>(input.shape[0]), static_cast<int>(input.shape[1]),
                          std::vector<uint8_t>(input.bytes.begin(), input.bytes.end())};
  int tile = static_cast<int>(meta["image_size"].cast<int64_t>());
  std::string mode = tiling["mode"].cast<ffi::String>();
  mlc_vision::Tiles tiles;
  if (mode == "internvl") {
    int min_tiles = opt.min_tiles.value_or(static_cast<int>(tiling["min_tiles"].cast<int64_t>()));
    int max_tiles = opt.max_tiles.value_or(static_cast<int>(tiling["max_tiles"].cast<int64_t>()));
    bool thumbnail = opt.thumbnail && tiling["thumbnail"].cast<bool>();
    tiles = mlc_vision::InternVLTiles(image, tile, min_tiles, max_tiles, thumbnail);
  } else {
    if (opt.min_tiles || opt.max_tiles || !opt.thumbnail) {
      throw std::runtime_error("min/max tiles and the thumbnail are InternVL options; this library tiles with anyres pinpoints");
    }
    std::vector<std::pair<int, int>> pins;
    for (const ffi::Any& p : tiling["grid_pinpoints"].cast<ffi::json::Array>()) {
      ffi::json::Array hw = p.cast<ffi::json::Array>();
      pins.emplace_back(static_cast<int>(hw[0].cast<int64_t>()), static_cast<int>(hw[1].cast<int64_t>()));
    }
    tiles = mlc_vision::AnyresTiles(image, tile, pins);
  }
  std::vector<int64_t> tile_shape{tiles.count, tile, tile, 3};
  std::vector<char> tile_bytes(tiles.pixels.begin(), tiles.pixels.end());
  if (!opt.tiles_out.empty()) WriteNpy(opt.tiles_out, tile_shape, "|u1", tile_bytes);

  std::vector<int64_t> shape;
  ffi::Function encode_rgb8 = Entry(vm, meta, "encode_rgb8");
  std::vector<char> features =
      ToHost(encode_rgb8(ToDevice(tile_shape, "uint8", tile_bytes, device), params).cast<Tensor>(), &shape);
  std::string dtype = meta["dtype"].cast<ffi::String>();
  std::string extra = tiles.thumbnail ? " + thumbnail" : tiles.base ? " + base image" : "";
  std::cout << "grid " << tiles.grid.str() << extra << " -> " << tiles.count << " tiles";
  ffi::Any newline_spec = tiling.count("image_newline") ? tiling["image_newline"] : ffi::Any(nullptr);
  if (tiles.base && newline_spec != nullptr) {
    std::string name = newline_spec.cast<ffi::json::Object>()["param"].cast<ffi::String>();
    ffi::Array<ffi::String> names{ffi::String(name)};
    Tensor newline_tensor = Global("vm.builtin.param_array_from_cache_by_name")(names).cast<ffi::Array<Tensor>>()[0];
    std::vector<int64_t> newline_shape;
    std::vector<char> newline = ToHost(newline_tensor, &newline_shape);
    int anyres_max = tiling.count("anyres_max") && tiling["anyres_max"] != nullptr
                         ? static_cast<int>(tiling["anyres_max"].cast<int64_t>())
                         : 0;
    size_t row_bytes = static_cast<size_t>(shape[2]) * DtypeBytes(dtype);
    if (newline.size() != row_bytes) throw std::runtime_error(name + " does not have the output width");
    features = Pack(features, newline, static_cast<int>(shape[1]), static_cast<int>(shape[2]), dtype, tiles.grid,
                    image.height, image.width, anyres_max);
    shape = {static_cast<int64_t>(features.size() / row_bytes), shape[2]};
    std::cout << " -> " << shape[0] << " packed tokens";
  }
  WriteNpy(output_path, shape, NpyDescr(dtype), features);
  std::cout << " -> " << output_path << "\n";
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 5) {
    std::cerr << "usage: " << argv[0]
              << " LIB PARAMS_DIR INPUT(.npy|raw f32) OUTPUT.npy [--device cpu|cuda[:N]] [--entry encode|encode_rgb8]\n"
              << "       " << argv[0]
              << " LIB PARAMS_DIR IMAGE.npy OUTPUT.npy --tiles [--max-tiles N] [--min-tiles M] [--no-thumbnail]"
                 " [--tiles-out TILES.npy]\n";
    return 2;
  }
  std::string lib_path = argv[1], params_dir = argv[2], input_path = argv[3], output_path = argv[4];
  std::string device_spec = "cpu", entry = "encode";
  bool tiled = false;
  TileOptions tile_options;
  for (int i = 5; i < argc; ++i) {
    std::string flag = argv[i];
    bool has_value = i + 1 < argc;
    if (flag == "--tiles") tiled = true;
    else if (flag == "--no-thumbnail") tile_options.thumbnail = false;
    else if (flag == "--device" && has_value) device_spec = argv[++i];
    else if (flag == "--entry" && has_value) entry = argv[++i];
    else if (flag == "--max-tiles" && has_value) tile_options.max_tiles = std::stoi(argv[++i]);
    else if (flag == "--min-tiles" && has_value) tile_options.min_tiles = std::stoi(argv[++i]);
    else if (flag == "--tiles-out" && has_value) tile_options.tiles_out = argv[++i];
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
    // An fp32 CPU library packs its linear layers' weights once here; its entries' twins then read them packed.
    params = PrepackedParams(vm, meta, params);

    // 4. The input, checked against the library's geometry.
    std::string raw = ReadFile(input_path);
    if (tiled) {
      if (raw.rfind("\x93NUMPY", 0) != 0) throw std::runtime_error("--tiles takes a .npy image");
      EncodeTiles(vm, meta, params, ReadNpy(input_path, raw), tile_options, device, output_path);
      return 0;
    }
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

    // 5. Run and copy the outputs back: [batch, tokens, width] features in the library's dtype, then (InternVL-14B)
    //    the other outputs the metadata lists in entries.encode.outputs; encode returns a tuple when there are several.
    std::vector<std::string> output_names = OutputNames(meta);
    ffi::Any result = Entry(vm, meta, entry)(pixels, params);
    std::vector<Tensor> outputs;
    if (output_names.size() == 1) {
      outputs.push_back(result.cast<Tensor>());
    } else {
      for (const Tensor& t : result.cast<ffi::Array<Tensor>>()) outputs.push_back(t);
      if (outputs.size() != output_names.size()) throw std::runtime_error("the library's outputs do not match its metadata");
    }
    std::string descr = dtype == "float32" ? "<f4" : dtype == "float16" ? "<f2" : "<u2";  // bf16 as raw uint16
    std::vector<int64_t> out_shape;
    for (size_t i = 0; i < outputs.size(); ++i) {
      std::vector<int64_t> shape;
      std::vector<char> bytes = ToHost(outputs[i], &shape);
      std::string path = i == 0 ? output_path : ExtraOutputPath(output_path, output_names[i]);
      WriteNpy(path, shape, descr, bytes);
      if (i == 0) {
        out_shape = shape;
      } else {
        std::cout << output_names[i] << " [" << shape[0] << ", " << shape[1] << ", " << shape[2] << "] -> " << path << "\n";
      }
    }
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
