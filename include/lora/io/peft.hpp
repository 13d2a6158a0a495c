// peft.hpp: Hugging Face PEFT LoRA adapters, read and written as PEFT does:
// a directory with adapter_config.json and adapter_model.safetensors.
//
//   auto a = lora::io::load_peft<float>("out/checkpoint-500");   // or load_peft(dir, "alt")
//   const auto& q = a.module("model.layers.0.self_attn.q_proj");
//   lora::AdaptedLinear layer{W_q, b_q + q.bias_delta(), q.delta()};   // PEFT's forward
//   lora::io::save_peft(a, "exported");   // PeftModel.from_pretrained(model, "exported") loads it
//
// PEFT's rules followed here (peft 0.21, src/peft/...): scaling alpha / r or alpha / sqrt(r)
// (tuners/lora/layer.py), rank_pattern / alpha_pattern matched with utils/other.py
// get_pattern_key (the first key, in file order, for which re.match(rf"(.*\.)?({key})$", path)
// matches), key names of utils/save_and_load.py ("base_model.model.<path>.lora_A.weight", the
// adapter name removed), target selection of tuners_utils.check_target_module_exists.
// docs/io_peft.md lists what is refused and why.
#pragma once

#include "../lora.hpp"
#include "safetensors.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <regex>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

namespace lora::io {

namespace detail::peft {

using lora::detail::raise;
using OrderedJson = nlohmann::ordered_json;

/// Longest rank_pattern / alpha_pattern / target regex accepted. Real keys are module
/// paths (under 200 characters); the bound keeps std::regex's recursive compiler
/// and its state count small on hostile input.
inline constexpr std::size_t max_pattern_length = 1000;
/// Deepest JSON nesting accepted in adapter_config.json (PEFT's own is 3 deep):
/// nlohmann's dump recurses once per level.
inline constexpr int max_json_depth = 64;

inline constexpr std::string_view key_prefix = "base_model.model.";

/// A JSON value for a message: compact, ASCII, at most 60 characters.
template <class J>
std::string preview(const J& v) {
  std::string s = v.dump(-1, ' ', true, nlohmann::json::error_handler_t::replace);
  if (s.size() > 60) s = s.substr(0, 57) + "...";
  return s;
}

/// Compiles a PEFT pattern (a Python regex) as ECMAScript. Python-only syntax
/// ((?P<name>...), lookbehind, \A, \Z, inline flags) does not compile and is
/// refused by name; back-references are refused because they force std::regex
/// into its exponential backtracking mode.
inline std::shared_ptr<const std::regex> compile(std::string_view where, std::string_view label,
                                                  std::string_view option, const std::string& key,
                                                  const std::string& pattern) {
  if (key.size() > max_pattern_length)
    raise<ValueError>(where, ": ", label, ": ", option, " key of ", key.size(), " characters is longer than ",
                      max_pattern_length, " (a module-name pattern)");
  for (std::size_t i = 0; i + 1 < key.size(); ++i) {
    if (key[i] != '\\') continue;
    const char next = key[i + 1];
    if ((next >= '1' && next <= '9') || next == 'k')
      raise<ValueError>(where, ": ", label, ": ", option, " key '", key,
                        "' uses a back-reference, which is not supported in module-name patterns");
    ++i;  // skip the escaped character (an escaped backslash included)
  }
  auto flags = std::regex::ECMAScript;
#if defined(__GLIBCXX__)
  // libstdc++'s breadth-first executor: time polynomial in the pattern and the path.
  flags |= std::regex_constants::__polynomial;
#endif
  try {
    return std::make_shared<const std::regex>(pattern, flags);
  } catch (const std::regex_error& e) {
    raise<ValueError>(where, ": ", label, ": ", option, " key '", key,
                      "' is not a regular expression std::regex (ECMAScript) accepts: ", e.what());
  }
}

/// Compiled patterns by their full pattern text, shared by copies of a config
/// (the text is the key, so editing a config never finds a stale entry).
struct RegexCache {
  std::mutex mutex;
  std::map<std::string, std::shared_ptr<const std::regex>> compiled;

  std::shared_ptr<const std::regex> get(std::string_view where, std::string_view label, std::string_view option,
                                        const std::string& key, const std::string& pattern) {
    {
      std::lock_guard lock(mutex);
      if (auto it = compiled.find(pattern); it != compiled.end()) return it->second;
    }
    auto re = compile(where, label, option, key, pattern);
    std::lock_guard lock(mutex);
    return compiled.emplace(pattern, std::move(re)).first->second;
  }
};

/// re.match: anchored at the start, not at the end.
inline bool match_prefix(std::string_view where, const std::regex& re, std::string_view s,
                         std::match_results<std::string_view::const_iterator>* m = nullptr) {
  try {
    std::match_results<std::string_view::const_iterator> local;
    return std::regex_search(s.begin(), s.end(), m ? *m : local, re, std::regex_constants::match_continuous);
  } catch (const std::regex_error& e) {
    raise<ValueError>(where, ": matching '", s, "' failed: ", e.what());
  }
}

/// re.fullmatch.
inline bool match_full(std::string_view where, const std::regex& re, std::string_view s) {
  try {
    return std::regex_match(s.begin(), s.end(), re);
  } catch (const std::regex_error& e) {
    raise<ValueError>(where, ": matching '", s, "' failed: ", e.what());
  }
}

inline bool ends_with_component(std::string_view path, std::string_view name) {
  return path.size() > name.size() && path.ends_with(name) && path[path.size() - name.size() - 1] == '.';
}

/// Python's re.escape for the characters that mean something to a regex.
inline std::string regex_escape(std::string_view s) {
  std::string out;
  for (char c : s) {
    if (std::string_view("\\^$.|?*+()[]{}").find(c) != std::string_view::npos) out += '\\';
    out += c;
  }
  return out;
}

/// A double as JSON the way Python writes the same number: integral values as
/// integers (PEFT's lora_alpha is an int), others as floats.
inline nlohmann::json json_number(double v) {
  if (std::isfinite(v) && v == std::floor(v) && std::fabs(v) < 9007199254740992.0)
    return nlohmann::json(static_cast<std::int64_t>(v));
  return nlohmann::json(v);
}

inline std::vector<std::string> split_path(std::string_view s) {
  std::vector<std::string> parts;
  std::size_t start = 0;
  for (;;) {
    const std::size_t dot = s.find('.', start);
    parts.emplace_back(s.substr(start, dot == std::string_view::npos ? std::string_view::npos : dot - start));
    if (dot == std::string_view::npos) break;
    start = dot + 1;
  }
  return parts;
}

inline std::string join(const std::vector<std::string>& parts, std::size_t begin, std::size_t end) {
  std::string out;
  for (std::size_t i = begin; i < end; ++i) {
    if (i > begin) out += '.';
    out += parts[i];
  }
  return out;
}

inline std::string read_text_file(const std::filesystem::path& p, std::string_view where) {
  std::ifstream in(p, std::ios::binary);
  if (!in) raise<Error>(where, ": cannot open ", p.string());
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) raise<Error>(where, ": cannot read ", p.string());
  return ss.str();
}

/// Writes bytes to a temporary name next to `target`, then renames it over
/// `target`: a reader sees the old file or the new one, never half of one.
inline void write_atomic(const std::filesystem::path& target, std::span<const std::byte> bytes,
                         std::string_view where) {
  std::random_device rd;
  const auto tag = (static_cast<std::uint64_t>(rd()) << 32) ^ rd();
  std::ostringstream name;
  name << '.' << target.filename().string() << ".tmp-" << std::hex << tag;
  const std::filesystem::path tmp = target.parent_path() / name.str();
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) raise<Error>(where, ": cannot create ", tmp.string());
    out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    out.flush();
    if (!out) {
      out.close();
      std::error_code ignore;
      std::filesystem::remove(tmp, ignore);
      raise<Error>(where, ": writing ", tmp.string(), " failed (disk full?)");
    }
  }
  std::error_code ec;
  std::filesystem::rename(tmp, target, ec);
  if (ec) {
    std::error_code ignore;
    std::filesystem::remove(tmp, ignore);
    raise<Error>(where, ": cannot rename ", tmp.string(), " to ", target.string(), ": ", ec.message());
  }
}

}  // namespace detail::peft

/// adapter_config.json of a PEFT LoRA adapter: the fields that decide what the
/// tensors mean, and the whole file as read (`raw`, written back by to_json).
struct PeftConfig {
  std::string peft_type = "LORA";
  std::optional<std::string> task_type;
  std::optional<std::string> base_model_name_or_path;
  int r = 8;
  double lora_alpha = 8;
  bool use_rslora = false;
  bool use_dora = false;        ///< DoRA: every linear module carries lora_magnitude_vector
  bool fan_in_fan_out = false;  ///< base weight stored [in, out] (GPT-2's Conv1D); A and B are not affected
  bool lora_bias = false;       ///< lora_B has a bias (PEFT's lora_bias=True)
  std::string bias = "none";    ///< "none", "all", "lora_only": trained base biases are in PeftAdapter::saved
  /// target_modules: a list of names (nullopt: null, PEFT then picks by model type),
  /// or one regex (target_modules_regex; "all-linear" is PEFT's shorthand).
  std::optional<std::vector<std::string>> target_modules;
  std::optional<std::string> target_modules_regex;
  std::vector<std::string> exclude_modules;
  std::optional<std::string> exclude_modules_regex;
  std::vector<std::string> modules_to_save;
  /// Patterns in file order: PEFT takes the first key that matches.
  std::vector<std::pair<std::string, int>> rank_pattern;
  std::vector<std::pair<std::string, double>> alpha_pattern;
  std::vector<std::int64_t> layers_to_transform;  ///< empty: all layers
  std::vector<std::string> layers_pattern;
  /// true / false / "gaussian" / ...: only decides PEFT's initial A, B, which loading
  /// overwrites (the inits that rewrite the base weight are refused).
  nlohmann::ordered_json init_lora_weights = true;
  double lora_dropout = 0;
  /// The file as parsed (keys in file order), unknown keys included.
  nlohmann::ordered_json raw = nlohmann::ordered_json::object();
  /// Label used in messages (the file's path after load_peft).
  std::string label = "<config>";
  /// Compiled patterns, shared by copies (keyed by pattern text).
  std::shared_ptr<detail::peft::RegexCache> regex_cache = std::make_shared<detail::peft::RegexCache>();

  /// Parses adapter_config.json text. FormatError (naming `label` and the key) for
  /// malformed JSON or a value of the wrong type; ValueError naming the option for
  /// a PEFT method or option that changes the forward and is not supported.
  static PeftConfig parse(std::string_view json_text, std::string_view label);

  /// r for a module path ("model.layers.0.self_attn.q_proj"): rank_pattern's first
  /// matching key in file order, else r.
  int rank_for(std::string_view module_path) const;
  /// lora_alpha for a module path: alpha_pattern's first matching key, else lora_alpha.
  double alpha_for(std::string_view module_path) const;
  /// The rank_pattern / alpha_pattern key that decides the module, or nullptr.
  const std::string* rank_pattern_key(std::string_view module_path) const;
  const std::string* alpha_pattern_key(std::string_view module_path) const;
  /// PEFT's scale for the module as DeltaOptions: alpha / r or alpha / sqrt(r); an
  /// alpha of 0 gives scale 0 ({.alpha = 0, .user_scale = 0}: lora's alpha = 0
  /// would otherwise mean "use user_scale").
  DeltaOptions options_for(std::string_view module_path) const;
  /// Whether PEFT puts a LoRA layer on this module (check_target_module_exists):
  /// exclude_modules, modules_to_save, target_modules (list: the name or a
  /// ".name" suffix; a string: a full regex match, "all-linear" matching every
  /// path), layers_to_transform / layers_pattern. True when target_modules is
  /// null (PEFT then picks by model type, which a file does not say).
  bool targets(std::string_view module_path) const;

  /// The JSON PEFT writes (keys sorted, 2-space indent, ASCII): `raw` with the
  /// modelled fields set from this struct and inference_mode true.
  std::string to_json() const;

};

/// One adapted module. Linear (nn.Linear, Conv1D): A [r, in], B [out, r], as PEFT
/// stores lora_A.weight / lora_B.weight. Embedding (embedding = true): A is
/// lora_embedding_A [r, num_embeddings] and B is lora_embedding_B [dim, r], as
/// stored; the delta B A is then [dim, num_embeddings], the transpose of the
/// table's update, and the adapted row of token t is table[t] + s * B A[:, t].
template <class T = float>
struct PeftModule {
  std::string path;
  RowMatrix<T> A, B;
  DeltaOptions options;  ///< PEFT's scale exactly (see PeftConfig::options_for)
  std::optional<Eigen::Matrix<T, Eigen::Dynamic, 1>> bias;  ///< lora_B.bias [out] (lora_bias=True)
  /// DoRA's magnitude m [out] (lora_magnitude_vector, use_dora=True): build the
  /// layer with make_peft_dora (<lora/io/peft_dora.hpp>).
  std::optional<Eigen::Matrix<T, Eigen::Dynamic, 1>> magnitude;
  DType stored = DType::F32;  ///< dtype of lora_A in the file
  bool embedding = false;

  index_t rank() const { return A.rows(); }
  double scale() const { return scale_for(options, rank()); }
  /// The delta s B A with a run-time rank (throws RankError where PEFT's r exceeds
  /// min(out, in), which PEFT allows and LowRankDelta does not).
  LowRankDelta<T> delta() const { return LowRankDelta<T>(B, A, options); }
  /// What the adapter adds to the layer's bias: s * lora_B.bias, zeros without one
  /// (PEFT's Linear computes lora_B(lora_A(x)) * s, bias inside).
  Eigen::Matrix<T, Eigen::Dynamic, 1> bias_delta() const {
    if (!bias) return Eigen::Matrix<T, Eigen::Dynamic, 1>::Zero(B.rows());
    return *bias * static_cast<T>(scale());
  }
};

/// A loaded (or to be saved) PEFT adapter.
template <class T = float>
struct PeftAdapter {
  std::string name = "default";
  PeftConfig config;
  std::vector<PeftModule<T>> modules;  ///< sorted by path
  /// Every other tensor of the file, by its full key ("base_model.model.score.weight"):
  /// modules_to_save copies, trained base biases (bias "all" / "lora_only"), saved
  /// embedding layers. PEFT loads each into the base parameter of that name, so they
  /// replace those parameters. 1-D tensors are kept as [1, n].
  std::map<std::string, RowMatrix<T>> saved;
  /// The stored shape of each entry of `saved` ({n} for a 1-D tensor); save_peft
  /// writes an entry without one as 2-D.
  std::map<std::string, std::vector<std::int64_t>> saved_shape;

  bool contains(std::string_view path) const { return find(path) != nullptr; }
  /// The module at `path`; ValueError naming it (and the adapter) where absent.
  const PeftModule<T>& module(std::string_view path) const {
    const PeftModule<T>* m = find(path);
    if (!m)
      lora::detail::raise<ValueError>("PeftAdapter::module: adapter '", name, "' (", config.label,
                                      ") has no LoRA module '", path, "' (", modules.size(), " modules)");
    return *m;
  }
  /// The module at `path`, or nullptr (modules must be sorted by path).
  const PeftModule<T>* find(std::string_view path) const {
    auto it = std::lower_bound(modules.begin(), modules.end(), path,
                               [](const PeftModule<T>& m, std::string_view p) { return m.path < p; });
    return it == modules.end() || it->path != path ? nullptr : &*it;
  }
};

// ---- PeftConfig ------------------------------------------------------------------

inline PeftConfig PeftConfig::parse(std::string_view json_text, std::string_view label) {
  using detail::peft::OrderedJson;
  using detail::peft::preview;
  using lora::detail::raise;
  constexpr const char* where = "PeftConfig::parse";

  OrderedJson j;
  try {
    j = OrderedJson::parse(json_text.begin(), json_text.end(),
                           [&](int depth, OrderedJson::parse_event_t event, OrderedJson&) {
                             if ((event == OrderedJson::parse_event_t::object_start ||
                                  event == OrderedJson::parse_event_t::array_start) &&
                                 depth >= detail::peft::max_json_depth)
                               raise<FormatError>(where, ": ", label, ": JSON nested deeper than ",
                                                  detail::peft::max_json_depth, " levels");
                             return true;
                           });
  } catch (const nlohmann::json::parse_error& e) {
    raise<FormatError>(where, ": ", label, ": malformed JSON at byte ", e.byte, ": ", e.what());
  } catch (const nlohmann::json::exception& e) {  // a number out of double's range
    raise<FormatError>(where, ": ", label, ": malformed JSON: ", e.what());
  }
  if (!j.is_object())
    raise<FormatError>(where, ": ", label, ": the top level is a JSON ", j.type_name(), ", expected an object");

  PeftConfig c;
  c.label = std::string(label);

  // A key's value, or nullptr when absent or null (Python reads null as None,
  // which every optional option treats as "not set").
  auto get = [&](const char* key) -> const OrderedJson* {
    auto it = j.find(key);
    return it == j.end() || it->is_null() ? nullptr : &*it;
  };
  auto type_error = [&](const char* key, const char* expected, const OrderedJson& v) {
    raise<FormatError>(where, ": ", label, ": key '", key, "' must be ", expected, ", got ", v.type_name(), " ",
                       preview(v));
  };
  auto get_bool = [&](const char* key, bool fallback) {
    const OrderedJson* v = get(key);
    if (!v) return fallback;
    if (!v->is_boolean()) type_error(key, "true or false", *v);
    return v->get<bool>();
  };
  auto get_string = [&](const char* key) -> std::optional<std::string> {
    const OrderedJson* v = get(key);
    if (!v) return std::nullopt;
    if (!v->is_string()) type_error(key, "a string", *v);
    return v->get<std::string>();
  };
  auto get_string_list = [&](const char* key, const OrderedJson& v) {
    if (!v.is_array()) type_error(key, "a list of strings", v);
    std::vector<std::string> out;
    for (const auto& e : v) {
      if (!e.is_string())
        raise<FormatError>(where, ": ", label, ": key '", key, "' must be a list of strings, it holds ", e.type_name(),
                           " ", preview(e));
      out.push_back(e.get<std::string>());
    }
    return out;
  };
  auto refuse_if_set = [&](const char* key, const char* what) {
    const OrderedJson* v = get(key);
    if (!v) return;
    // PEFT tests these with bool(value): false and [] are off. An empty object is
    // a default sub-config, which is on.
    if (v->is_boolean() && !v->get<bool>()) return;
    if (v->is_array() && v->empty()) return;
    raise<ValueError>(where, ": ", label, ": ", key, " = ", preview(*v), " (", what,
                      ") changes the forward and is not supported");
  };

  // peft_type picks the method: PEFT cannot load a config without it.
  const OrderedJson* pt = get("peft_type");
  if (!pt) raise<FormatError>(where, ": ", label, ": missing key 'peft_type' (PEFT needs it to pick the method)");
  if (!pt->is_string()) type_error("peft_type", "a string", *pt);
  c.peft_type = pt->get<std::string>();
  if (c.peft_type != "LORA")
    raise<ValueError>(where, ": ", label, ": peft_type '", c.peft_type,
                      "' is not supported: only LORA adapters load (VeRA, LoHa, LoKr, AdaLoRA, IA3, ... store other "
                      "tensors and compute another forward)");

  c.task_type = get_string("task_type");
  c.base_model_name_or_path = get_string("base_model_name_or_path");

  if (auto it = j.find("r"); it != j.end()) {
    if (!it->is_number_integer()) type_error("r", "an integer", *it);
    const bool negative = it->is_number_integer() && !it->is_number_unsigned() && it->get<std::int64_t>() < 0;
    if (negative || it->get<std::uint64_t>() == 0)
      raise<ValueError>(where, ": ", label, ": r = ", preview(*it), " must be a positive integer");
    if (it->get<std::uint64_t>() > static_cast<std::uint64_t>(std::numeric_limits<int>::max()))
      raise<ValueError>(where, ": ", label, ": r = ", preview(*it), " is too large");
    c.r = static_cast<int>(it->get<std::int64_t>());
  }
  if (auto it = j.find("lora_alpha"); it != j.end()) {
    if (!it->is_number()) type_error("lora_alpha", "a number", *it);
    c.lora_alpha = it->get<double>();
    lora::detail::check_finite_parameter(where, "lora_alpha", c.lora_alpha);
  }
  if (const OrderedJson* v = get("lora_dropout")) {
    if (!v->is_number()) type_error("lora_dropout", "a number", *v);
    c.lora_dropout = v->get<double>();
  }

  c.use_rslora = get_bool("use_rslora", false);
  c.fan_in_fan_out = get_bool("fan_in_fan_out", false);
  c.lora_bias = get_bool("lora_bias", false);
  c.use_dora = get_bool("use_dora", false);
  if (get_bool("use_qalora", false))
    raise<ValueError>(where, ": ", label,
                      ": use_qalora = true (QA-LoRA pools the input in groups before A) changes the forward and is "
                      "not supported");
  (void)get_bool("inference_mode", false);
  (void)get_bool("ensure_weight_tying", false);

  refuse_if_set("layer_replication", "layers of the base model repeated");
  refuse_if_set("alora_invocation_tokens", "Activated LoRA applies the adapter only after the invocation tokens");
  refuse_if_set("trainable_token_indices", "trainable token rows of the embedding");
  refuse_if_set("target_parameters", "LoRA on nn.Parameter tensors, PEFT's ParamWrapper");
  refuse_if_set("use_bdlora", "block-diagonal A or B");
  refuse_if_set("arrow_config", "Arrow routing between experts");
  refuse_if_set("kasa_config", "KaSA's singular-value diagonal between A and B");
  refuse_if_set("monteclora_config", "Monte Carlo sampling of A in training");

  if (const OrderedJson* v = get("bias")) {
    if (!v->is_string()) type_error("bias", "a string", *v);
    c.bias = v->get<std::string>();
    if (c.bias != "none" && c.bias != "all" && c.bias != "lora_only")
      raise<ValueError>(where, ": ", label, ": bias = '", c.bias, "' is not one of none, all, lora_only");
  }

  if (auto it = j.find("init_lora_weights"); it != j.end() && !it->is_null()) {
    if (!it->is_boolean() && !it->is_string()) type_error("init_lora_weights", "true, false or a string", *it);
    if (it->is_string()) {
      const std::string s = it->get<std::string>();
      std::string lower = s;
      for (char& ch : lower) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
      if (lower.starts_with("pissa") || lower == "olora" || lower == "corda" || lower == "loftq" ||
          lower == "lora_ga")
        raise<ValueError>(where, ": ", label, ": init_lora_weights = '", s,
                          "' rewrites the base weights when PEFT loads the adapter (it subtracts the initial "
                          "adapter from W); convert it to plain LoRA (save_pretrained's "
                          "path_initial_model_for_weight_conversion) or set init_lora_weights to true");
    }
    c.init_lora_weights = *it;
  }

  if (auto it = j.find("target_modules"); it != j.end() && !it->is_null()) {
    if (it->is_string()) {
      c.target_modules_regex = it->get<std::string>();
    } else {
      c.target_modules = get_string_list("target_modules", *it);
    }
  }
  if (auto it = j.find("exclude_modules"); it != j.end() && !it->is_null()) {
    if (it->is_string())
      c.exclude_modules_regex = it->get<std::string>();
    else
      c.exclude_modules = get_string_list("exclude_modules", *it);
  }
  if (auto it = j.find("modules_to_save"); it != j.end() && !it->is_null()) {
    if (it->is_string())
      raise<FormatError>(where, ": ", label, ": key 'modules_to_save' must be a list of strings, got the string ",
                         preview(*it), " (PEFT would match each of its characters)");
    c.modules_to_save = get_string_list("modules_to_save", *it);
  }

  if (auto it = j.find("rank_pattern"); it != j.end() && !it->is_null()) {
    if (!it->is_object()) type_error("rank_pattern", "an object of pattern: rank", *it);
    for (const auto& [k, v] : it->items()) {
      if (!v.is_number_integer())
        raise<FormatError>(where, ": ", label, ": rank_pattern['", k, "'] must be an integer, got ", v.type_name(),
                           " ", preview(v));
      if ((!v.is_number_unsigned() && v.get<std::int64_t>() <= 0) || v.get<std::uint64_t>() == 0 ||
          v.get<std::uint64_t>() > static_cast<std::uint64_t>(std::numeric_limits<int>::max()))
        raise<ValueError>(where, ": ", label, ": rank_pattern['", k, "'] = ", preview(v),
                          " must be a positive integer");
      c.rank_pattern.emplace_back(k, static_cast<int>(v.get<std::int64_t>()));
    }
  }
  if (auto it = j.find("alpha_pattern"); it != j.end() && !it->is_null()) {
    if (!it->is_object()) type_error("alpha_pattern", "an object of pattern: alpha", *it);
    for (const auto& [k, v] : it->items()) {
      if (!v.is_number())
        raise<FormatError>(where, ": ", label, ": alpha_pattern['", k, "'] must be a number, got ", v.type_name(),
                           " ", preview(v));
      c.alpha_pattern.emplace_back(k, v.get<double>());
    }
  }

  if (auto it = j.find("layers_to_transform"); it != j.end() && !it->is_null()) {
    auto one = [&](const OrderedJson& e) {
      if (!e.is_number_integer()) type_error("layers_to_transform", "an integer or a list of integers", *it);
      return e.get<std::int64_t>();
    };
    if (it->is_array()) {
      for (const auto& e : *it) c.layers_to_transform.push_back(one(e));
    } else {
      c.layers_to_transform.push_back(one(*it));
    }
  }
  bool layers_pattern_set = false;
  if (auto it = j.find("layers_pattern"); it != j.end() && !it->is_null()) {
    if (it->is_string()) {
      if (!it->get<std::string>().empty()) c.layers_pattern.push_back(it->get<std::string>());
    } else {
      c.layers_pattern = get_string_list("layers_pattern", *it);
    }
    layers_pattern_set = true;
  }
  // LoraConfig.__post_init__'s own checks: PEFT refuses these configs.
  const bool layers_to_transform_set = get("layers_to_transform") != nullptr;
  if (c.target_modules_regex && layers_to_transform_set)
    raise<ValueError>(where, ": ", label, ": layers_to_transform cannot be used when target_modules is a string");
  if (c.target_modules_regex && layers_pattern_set)
    raise<ValueError>(where, ": ", label, ": layers_pattern cannot be used when target_modules is a string");
  if (!c.layers_pattern.empty() && !layers_to_transform_set)
    raise<ValueError>(where, ": ", label, ": layers_pattern is set but layers_to_transform is not");

  // Compile every pattern now so a bad one is reported by the parser, with its key.
  for (const auto& entry : c.rank_pattern)
    (void)c.regex_cache->get(where, label, "rank_pattern", entry.first, "(.*\\.)?(" + entry.first + ")$");
  for (const auto& entry : c.alpha_pattern)
    (void)c.regex_cache->get(where, label, "alpha_pattern", entry.first, "(.*\\.)?(" + entry.first + ")$");
  if (c.target_modules_regex && *c.target_modules_regex != "all-linear")
    (void)c.regex_cache->get(where, label, "target_modules", *c.target_modules_regex, *c.target_modules_regex);
  if (c.exclude_modules_regex)
    (void)c.regex_cache->get(where, label, "exclude_modules", *c.exclude_modules_regex, *c.exclude_modules_regex);
  for (const auto& m : c.modules_to_save)
    (void)c.regex_cache->get(where, label, "modules_to_save", m, "(^|.*\\.)" + m + "($|\\..*)");
  for (const auto& p : c.layers_pattern)
    (void)c.regex_cache->get(where, label, "layers_pattern", p, "(?:" + p + ")\\.(\\d+)\\.");

  c.raw = std::move(j);
  return c;
}

namespace detail::peft {
/// get_pattern_key: the first key (in order) for which
/// re.match(rf"(.*\.)?({key})$", path) matches; else a key equal to the path
/// (get_pattern_key then returns the path, and the dict lookup finds it: a key
/// whose regex does not match its own text, e.g. "a+b").
template <class Patterns>
const std::string* first_match(RegexCache& cache, std::string_view label, const Patterns& patterns,
                               const char* option, std::string_view path) {
  constexpr const char* where = "PeftConfig::rank_for / alpha_for";
  for (const auto& [key, value] : patterns) {
    (void)value;
    auto re = cache.get(where, label, option, key, "(.*\\.)?(" + key + ")$");
    if (match_prefix(where, *re, path)) return &key;
  }
  for (const auto& [key, value] : patterns) {
    (void)value;
    if (key == path) return &key;
  }
  return nullptr;
}
}  // namespace detail::peft

inline const std::string* PeftConfig::rank_pattern_key(std::string_view module_path) const {
  return detail::peft::first_match(*regex_cache, label, rank_pattern, "rank_pattern", module_path);
}
inline const std::string* PeftConfig::alpha_pattern_key(std::string_view module_path) const {
  return detail::peft::first_match(*regex_cache, label, alpha_pattern, "alpha_pattern", module_path);
}

inline int PeftConfig::rank_for(std::string_view module_path) const {
  const std::string* key = rank_pattern_key(module_path);
  if (!key) return r;
  for (const auto& [k, v] : rank_pattern)
    if (&k == key) return v;
  return r;
}

inline double PeftConfig::alpha_for(std::string_view module_path) const {
  const std::string* key = alpha_pattern_key(module_path);
  if (!key) return lora_alpha;
  for (const auto& [k, v] : alpha_pattern)
    if (&k == key) return v;
  return lora_alpha;
}

inline DeltaOptions PeftConfig::options_for(std::string_view module_path) const {
  const double alpha = alpha_for(module_path);
  // PEFT's scaling is alpha / r even at alpha = 0; lora's alpha = 0 means "user
  // scale", so spell PEFT's zero scale as a zero user scale.
  if (alpha == 0.0) return DeltaOptions{.alpha = 0.0, .rule = Scaling::standard, .user_scale = 0.0};
  return DeltaOptions{.alpha = alpha, .rule = use_rslora ? Scaling::rslora : Scaling::standard};
}

inline bool PeftConfig::targets(std::string_view key) const {
  constexpr const char* where = "PeftConfig::targets";
  using detail::peft::ends_with_component;
  auto re = [&](const char* option, const std::string& k, const std::string& pattern) {
    return regex_cache->get(where, label, option, k, pattern);
  };
  if (exclude_modules_regex) {
    if (detail::peft::match_full(where, *re("exclude_modules", *exclude_modules_regex, *exclude_modules_regex), key))
      return false;
  } else {
    for (const auto& e : exclude_modules)
      if (key == e || ends_with_component(key, e)) return false;
  }
  // A module of modules_to_save never gets a LoRA layer.
  for (const auto& m : modules_to_save)
    if (detail::peft::match_prefix(where, *re("modules_to_save", m, "(^|.*\\.)" + m + "($|\\..*)"), key)) return false;

  if (target_modules_regex) {
    if (*target_modules_regex == "all-linear") return true;  // every Linear: the type is not in the file
    return detail::peft::match_full(where, *re("target_modules", *target_modules_regex, *target_modules_regex), key);
  }
  if (!target_modules) return true;
  for (const auto& t : *target_modules)
    if (key == t) return true;
  bool found = false;
  for (const auto& t : *target_modules)
    if (ends_with_component(key, t)) found = true;
  if (!found || layers_to_transform.empty()) return found;

  // layers_to_transform: PEFT takes the layer index from the first match of
  // re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key), or of
  // rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\." per layers_pattern. The lazy prefix
  // is spelled out here (shortest first) because std::regex's polynomial
  // executor does not honour laziness in captures.
  std::vector<std::size_t> starts{0};  // where the lazy prefix can end: 0 and after each '.'
  for (std::size_t i = 0; i < key.size(); ++i)
    if (key[i] == '.') starts.push_back(i + 1);
  auto is_digits = [](std::string_view s) {
    return !s.empty() && std::all_of(s.begin(), s.end(), [](char ch) { return ch >= '0' && ch <= '9'; });
  };
  std::optional<std::string> digits;
  if (layers_pattern.empty()) {
    // ".*?\.[^.]*\.(\d+)\.": the first component j >= 2 that is all digits and not the last.
    const std::vector<std::string> parts = detail::peft::split_path(key);
    for (std::size_t j = 2; j + 1 < parts.size() && !digits; ++j)
      if (is_digits(parts[j])) digits = parts[j];
  } else {
    for (const auto& p : layers_pattern) {
      auto compiled = re("layers_pattern", p, "(?:" + p + ")\\.(\\d+)\\.");
      for (std::size_t s : starts) {
        std::match_results<std::string_view::const_iterator> m;
        if (detail::peft::match_prefix(where, *compiled, key.substr(s), &m)) {
          const std::size_t g = compiled->mark_count();  // (\d+) is the last group opened
          if (g < m.size() && m[g].matched) digits = m[g].str();
          break;
        }
      }
      if (digits) break;
    }
  }
  if (!digits || digits->size() > 18) return false;  // no index, or larger than any listed one
  const std::int64_t index = std::stoll(*digits);
  return std::find(layers_to_transform.begin(), layers_to_transform.end(), index) != layers_to_transform.end();
}

inline std::string PeftConfig::to_json() const {
  using detail::peft::json_number;
  using nlohmann::json;
  json out = json::object();
  if (raw.is_object()) out = json::parse(raw.dump(-1, ' ', false, json::error_handler_t::replace));
  // Where two spellings mean the same to PEFT (null or [], "x" or ["x"]), keep the file's.
  auto had = [&](const char* key, auto is) { return raw.is_object() && raw.contains(key) && is(raw[key]); };
  auto is_array = [](const auto& v) { return v.is_array(); };
  auto is_string = [](const auto& v) { return v.is_string(); };
  auto optional_string = [](const std::optional<std::string>& v) { return v ? json(*v) : json(nullptr); };

  out["peft_type"] = peft_type;
  out["task_type"] = optional_string(task_type);
  out["base_model_name_or_path"] = optional_string(base_model_name_or_path);
  out["r"] = r;
  out["lora_alpha"] = json_number(lora_alpha);
  out["lora_dropout"] = lora_dropout;
  out["use_rslora"] = use_rslora;
  out["use_dora"] = use_dora;
  out["fan_in_fan_out"] = fan_in_fan_out;
  out["lora_bias"] = lora_bias;
  out["bias"] = bias;
  out["inference_mode"] = true;  // what save_pretrained writes
  out["init_lora_weights"] = json::parse(init_lora_weights.dump(-1, ' ', false, json::error_handler_t::replace));
  if (target_modules_regex)
    out["target_modules"] = *target_modules_regex;
  else if (target_modules)
    out["target_modules"] = *target_modules;
  else
    out["target_modules"] = nullptr;
  if (exclude_modules_regex)
    out["exclude_modules"] = *exclude_modules_regex;
  else if (!exclude_modules.empty() || had("exclude_modules", is_array))
    out["exclude_modules"] = exclude_modules;
  else
    out["exclude_modules"] = nullptr;
  if (!modules_to_save.empty() || had("modules_to_save", is_array))
    out["modules_to_save"] = modules_to_save;
  else
    out["modules_to_save"] = nullptr;
  json rp = json::object(), ap = json::object();
  // A dict keeps one value per key; the first is the one a match can reach.
  for (const auto& [k, v] : rank_pattern)
    if (!rp.contains(k)) rp[k] = v;
  for (const auto& [k, v] : alpha_pattern)
    if (!ap.contains(k)) ap[k] = json_number(v);
  out["rank_pattern"] = std::move(rp);
  out["alpha_pattern"] = std::move(ap);
  if (layers_to_transform.size() == 1 && had("layers_to_transform", [](const auto& v) { return v.is_number(); }))
    out["layers_to_transform"] = layers_to_transform[0];
  else if (!layers_to_transform.empty() || had("layers_to_transform", is_array))
    out["layers_to_transform"] = layers_to_transform;
  else
    out["layers_to_transform"] = nullptr;
  if (layers_pattern.size() == 1 && had("layers_pattern", is_string))
    out["layers_pattern"] = layers_pattern[0];
  else if (!layers_pattern.empty() || had("layers_pattern", is_array))
    out["layers_pattern"] = layers_pattern;
  else if (had("layers_pattern", is_string))
    out["layers_pattern"] = "";
  else
    out["layers_pattern"] = nullptr;
  return out.dump(2, ' ', true, json::error_handler_t::replace);
}

// ---- loading ------------------------------------------------------------------

namespace detail::peft {

/// The LoRA tensors of one module, by the key each came from.
struct ModuleKeys {
  std::string a, b, bias, emb_a, emb_b, magnitude;
};

/// Where a LoRA tensor belongs: its module path and its slot, or nothing for a
/// tensor that is not a LoRA factor.
struct LoraKey {
  std::string module;
  enum Slot { a, b, b_bias, emb_a, emb_b, magnitude } slot;
};

/// Classifies a key of adapter_model.safetensors (after "base_model.model.").
/// PEFT's save strips the adapter name ("lora_A.default.weight" -> "lora_A.weight");
/// a key that still carries it loads in PEFT only when the name is the adapter
/// being loaded (the key then equals the model's own key).
inline std::optional<LoraKey> classify(std::string_view where, std::string_view file, const std::string& key,
                                       std::string_view rest, std::string_view adapter_name, bool velora) {
  const std::vector<std::string> c = split_path(rest);
  const std::size_t n = c.size();
  for (const auto& part : c)
    if (part.empty()) raise<FormatError>(where, ": ", file, ": tensor '", key, "' has an empty path component");
  auto is_ab = [](const std::string& s) { return s == "lora_A" || s == "lora_B"; };
  auto is_emb = [](const std::string& s) { return s == "lora_embedding_A" || s == "lora_embedding_B"; };
  auto check_name = [&](const std::string& name_in_key) {
    if (name_in_key != adapter_name)
      raise<FormatError>(where, ": ", file, ": tensor '", key, "' carries the adapter name '", name_in_key,
                         "' but the adapter being loaded is '", adapter_name,
                         "' (PEFT would not load it: the key matches no parameter)");
  };
  // <module>.lora_magnitude_vector (PEFT saves DoRA's m without ".<adapter>.weight";
  // a key that keeps them is accepted as for lora_A / lora_B)
  for (std::size_t i = 0; i < n; ++i) {
    if (c[i] != "lora_magnitude_vector") continue;
    const bool plain = i + 1 == n, weight = i + 2 == n && c[n - 1] == "weight",
               named = i + 3 == n && c[n - 1] == "weight";
    if (!plain && !weight && !named)
      raise<FormatError>(where, ": ", file, ": tensor '", key,
                         "': a DoRA magnitude key ends in lora_magnitude_vector[.<adapter>].weight");
    if (named) check_name(c[i + 1]);
    if (i == 0) raise<FormatError>(where, ": ", file, ": tensor '", key, "' names no module before ", c[i]);
    return LoraKey{join(c, 0, i), LoraKey::magnitude};
  }
  const std::string& last = c[n - 1];
  // <module>.lora_A|lora_B[.<adapter>].weight|bias
  if ((last == "weight" || last == "bias") && n >= 3) {
    std::size_t ab = n;
    if (is_ab(c[n - 2]))
      ab = n - 2;
    else if (n >= 4 && is_ab(c[n - 3])) {
      check_name(c[n - 2]);
      ab = n - 3;
    }
    if (ab != n) {
      if (ab == 0) raise<FormatError>(where, ": ", file, ": tensor '", key, "' names no module before ", c[ab]);
      LoraKey k{join(c, 0, ab), LoraKey::a};
      if (c[ab] == "lora_A") {
        if (last == "bias")
          raise<FormatError>(where, ": ", file, ": tensor '", key, "': PEFT's lora_A has no bias");
        k.slot = LoraKey::a;
      } else {
        k.slot = last == "bias" ? LoraKey::b_bias : LoraKey::b;
      }
      return k;
    }
  }
  // <module>.lora_embedding_A|B[.<adapter>]
  std::size_t emb = n;
  if (is_emb(last))
    emb = n - 1;
  else if (n >= 2 && is_emb(c[n - 2])) {
    check_name(last);
    emb = n - 2;
  }
  if (emb != n) {
    if (emb == 0) raise<FormatError>(where, ": ", file, ": tensor '", key, "' names no module before ", c[emb]);
    return LoraKey{join(c, 0, emb), c[emb] == "lora_embedding_A" ? LoraKey::emb_a : LoraKey::emb_b};
  }
  // Other per-layer adapter tensors (a LoRA variant's): refused by name, except
  // VeLoRA's projection, which only its training backward reads.
  for (std::size_t i = (n >= 3 ? n - 3 : 0); i < n; ++i) {
    if (!c[i].starts_with("lora_")) continue;
    if (velora && c[i] == "lora_velora_embed") return LoraKey{"", LoraKey::a};  // empty module: skip
    raise<ValueError>(where, ": ", file, ": tensor '", key, "' is a '", c[i],
                      "' tensor of a LoRA variant, which is not supported (only lora_A, lora_B, lora_B.bias, "
                      "lora_embedding_A, lora_embedding_B)");
  }
  return std::nullopt;
}

}  // namespace detail::peft

/// Loads a PEFT LoRA adapter. `dir` holds adapter_config.json and
/// adapter_model.safetensors, or dir/<adapter_name>/ does (where PEFT's
/// save_pretrained puts an adapter not named "default"). Tensors of any float
/// dtype (F64, F32, F16, BF16) convert to T.
template <class T = float>
PeftAdapter<T> load_peft(const std::filesystem::path& dir, std::string_view adapter_name = "default") {
  static_assert(std::is_floating_point_v<T>, "lora::io::load_peft<T>: T must be float or double");
  namespace fs = std::filesystem;
  using lora::detail::raise;
  using detail::peft::LoraKey;
  constexpr const char* where = "load_peft";

  fs::path root = dir;
  std::error_code ec;
  if (!fs::is_regular_file(root / "adapter_config.json", ec)) {
    const fs::path sub = dir / std::string(adapter_name);
    if (!adapter_name.empty() && fs::is_regular_file(sub / "adapter_config.json", ec))
      root = sub;
    else
      raise<FormatError>(where, ": no adapter_config.json in ", dir.string(), " nor in ", sub.string(),
                         " (adapter '", adapter_name, "')");
  }
  const fs::path config_path = root / "adapter_config.json";
  const fs::path weights_path = root / "adapter_model.safetensors";
  if (!fs::is_regular_file(weights_path, ec)) {
    if (fs::exists(root / "adapter_model.bin", ec))
      raise<FormatError>(where, ": ", (root / "adapter_model.bin").string(),
                         " is a pickle (torch.save) file, which is not supported: save the adapter with "
                         "safe_serialization=True (adapter_model.safetensors)");
    raise<FormatError>(where, ": no adapter_model.safetensors in ", root.string());
  }

  PeftAdapter<T> a;
  a.name = std::string(adapter_name);
  a.config = PeftConfig::parse(detail::peft::read_text_file(config_path, where), config_path.string());
  const PeftConfig& cfg = a.config;
  const bool velora = cfg.raw.contains("velora_config") && !cfg.raw["velora_config"].is_null();

  const SafetensorsFile file = SafetensorsFile::open(weights_path);
  const std::string label = weights_path.string();

  std::map<std::string, detail::peft::ModuleKeys> found;
  for (const TensorInfo& t : file.tensors()) {
    const std::string& key = t.name;
    if (!std::string_view(key).starts_with(detail::peft::key_prefix))
      raise<FormatError>(where, ": ", label, ": tensor '", key, "' is not a PEFT key (PEFT's keys start with '",
                         detail::peft::key_prefix,
                         "'); PEFT would ignore it, so the file is probably not a PEFT adapter");
    const std::string_view rest = std::string_view(key).substr(detail::peft::key_prefix.size());
    const auto lk = detail::peft::classify(where, label, key, rest, adapter_name, velora);
    if (!is_floating_dtype(t.dtype))
      raise<FormatError>(where, ": ", label, ": tensor '", key, "' has dtype ", dtype_name(t.dtype),
                         "; only F64, F32, F16 and BF16 tensors are supported");
    if (!lk) {
      // Not a LoRA factor: PEFT loads it into the base parameter of that name.
      if (t.shape.size() != 1 && t.shape.size() != 2)
        raise<FormatError>(where, ": ", label, ": tensor '", key, "' has ", t.shape.size(),
                           " dimensions; only 1-D and 2-D saved tensors (modules_to_save, biases) are supported");
      a.saved.emplace(key, file.read<T>(key));
      a.saved_shape.emplace(key, t.shape);
      continue;
    }
    if (lk->module.empty()) continue;  // VeLoRA's training-only buffer
    auto& slots = found[lk->module];
    std::string* slot = nullptr;
    switch (lk->slot) {
      case LoraKey::a: slot = &slots.a; break;
      case LoraKey::b: slot = &slots.b; break;
      case LoraKey::b_bias: slot = &slots.bias; break;
      case LoraKey::emb_a: slot = &slots.emb_a; break;
      case LoraKey::emb_b: slot = &slots.emb_b; break;
      case LoraKey::magnitude: slot = &slots.magnitude; break;
    }
    if (!slot->empty())
      raise<FormatError>(where, ": ", label, ": tensors '", *slot, "' and '", key,
                         "' are the same parameter of module '", lk->module,
                         "' (one with the adapter name, one without)");
    *slot = key;
  }

  auto shape_str = [](const std::vector<std::int64_t>& s) {
    std::string out = "[";
    for (std::size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
    return out + "]";
  };
  auto check_2d = [&](const std::string& key) -> const TensorInfo& {
    const TensorInfo& t = file.info(key);
    if (t.shape.size() != 2)
      raise<FormatError>(where, ": ", label, ": tensor '", key, "' has shape ", shape_str(t.shape),
                         "; a LoRA factor has 2 dimensions");
    if (t.shape[0] <= 0 || t.shape[1] <= 0)
      raise<FormatError>(where, ": ", label, ": tensor '", key, "' has shape ", shape_str(t.shape),
                         " (empty: a sharded save that was never gathered?)");
    return t;
  };

  for (auto& [path, keys] : found) {
    const bool linear = !keys.a.empty() || !keys.b.empty() || !keys.bias.empty() || !keys.magnitude.empty();
    const bool emb = !keys.emb_a.empty() || !keys.emb_b.empty();
    if (linear && emb)
      raise<FormatError>(where, ": ", label, ": module '", path,
                         "' has both lora_A/lora_B and lora_embedding_A/lora_embedding_B tensors");
    const std::string& ka = linear ? keys.a : keys.emb_a;
    const std::string& kb = linear ? keys.b : keys.emb_b;
    const char* name_a = linear ? "lora_A.weight" : "lora_embedding_A";
    const char* name_b = linear ? "lora_B.weight" : "lora_embedding_B";
    if (ka.empty() || kb.empty()) {
      const std::string& have = ka.empty() ? (kb.empty() ? (keys.bias.empty() ? keys.magnitude : keys.bias) : kb) : ka;
      raise<FormatError>(where, ": ", label, ": tensor '", have, "' has no matching ", ka.empty() ? name_a : name_b,
                         " for module '", path, "'");
    }
    if (!cfg.targets(path))
      raise<FormatError>(where, ": ", label, ": module '", path,
                         "' has LoRA tensors but the config's target_modules / exclude_modules / "
                         "layers_to_transform / modules_to_save do not select it: PEFT would create no LoRA layer "
                         "there and ignore them");
    const TensorInfo& ta = check_2d(ka);
    const TensorInfo& tb = check_2d(kb);
    if (tb.shape[1] != ta.shape[0])
      raise<RankError>(where, ": ", label, ": module '", path, "': rank mismatch between '", ka, "' ",
                       shape_str(ta.shape), " (r = ", ta.shape[0], ") and '", kb, "' ", shape_str(tb.shape),
                       " (r = ", tb.shape[1], ")");
    const int r_cfg = cfg.rank_for(path);
    if (ta.shape[0] != r_cfg) {
      const std::string* pk = cfg.rank_pattern_key(path);
      raise<RankError>(where, ": ", label, ": module '", path, "': the tensors have rank ", ta.shape[0],
                       " but ", cfg.label, " gives r = ", r_cfg,
                       pk ? " (rank_pattern['" + *pk + "'])" : std::string(" (r; no rank_pattern key matches)"),
                       "; PEFT would fail to load it (size mismatch)");
    }

    PeftModule<T> m;
    m.path = path;
    m.embedding = emb;
    m.stored = ta.dtype;
    m.A = file.read<T>(ka);
    m.B = file.read<T>(kb);
    m.options = cfg.options_for(path);
    if (emb && cfg.use_dora)
      raise<ValueError>(where, ": ", cfg.label, ": use_dora = true on the embedding '", path,
                        "': DoRA on embeddings is not supported (DoRALinear is a linear layer)");
    if (!keys.magnitude.empty()) {
      if (!cfg.use_dora)
        raise<FormatError>(where, ": ", label, ": tensor '", keys.magnitude,
                           "' is a DoRA magnitude but the config has use_dora = false (PEFT would not load it)");
      const TensorInfo& tm = file.info(keys.magnitude);
      if (tm.shape.size() != 1 || tm.shape[0] != tb.shape[0])
        raise<ShapeError>(where, ": ", label, ": tensor '", keys.magnitude, "' has shape ", shape_str(tm.shape),
                          ", expected [", tb.shape[0], "] (lora_B's rows, out_features)");
      m.magnitude = file.read_vector<T>(keys.magnitude);
    } else if (linear && cfg.use_dora) {
      raise<FormatError>(where, ": ", label, ": module '", path,
                         "' has no lora_magnitude_vector but the config has use_dora = true");
    }
    if (emb && cfg.lora_bias)
      raise<ValueError>(where, ": ", cfg.label, ": lora_bias = true is not supported by PEFT for the embedding '",
                        path, "'");
    if (!keys.bias.empty()) {
      if (!cfg.lora_bias)
        raise<FormatError>(where, ": ", label, ": tensor '", keys.bias,
                           "' is a lora_B bias but the config has lora_bias = false (PEFT would ignore it)");
      const TensorInfo& tbias = file.info(keys.bias);
      if (tbias.shape.size() != 1 || tbias.shape[0] != tb.shape[0])
        raise<ShapeError>(where, ": ", label, ": tensor '", keys.bias, "' has shape ", shape_str(tbias.shape),
                          ", expected [", tb.shape[0], "] (lora_B's rows, out_features)");
      m.bias = file.read_vector<T>(keys.bias);
    } else if (linear && cfg.lora_bias) {
      raise<FormatError>(where, ": ", label, ": module '", path,
                         "' has no lora_B.bias but the config has lora_bias = true");
    }
    a.modules.push_back(std::move(m));
  }
  return a;  // `found` is a std::map: modules come out sorted by path
}

// ---- saving ------------------------------------------------------------------

/// A PeftModule from a delta: A, B and the scale. PEFT knows only alpha with the
/// rule alpha / r or alpha / sqrt(r), so a user scale (alpha = 0) or a multiplier
/// other than 1 is folded into an alpha giving the same scale; a zero scale gives
/// alpha 0.
template <class T, int R, class Backend>
PeftModule<T> to_peft_module(std::string path, const LowRankDelta<T, R, Backend>& d) {
  static_assert(std::is_same_v<Backend, EigenBackend>,
                "lora::io::to_peft_module: the delta must live on the Eigen (CPU) backend; copy a device delta "
                "to the host first");
  d.check_consistent("to_peft_module");
  PeftModule<T> m;
  m.path = std::move(path);
  m.A = d.A();
  m.B = d.B();
  m.stored = dtype_of<T>();
  const DeltaOptions& o = d.options();
  const index_t r = d.rank();
  if (o.alpha != 0.0 && o.multiplier == 1.0) {
    m.options = DeltaOptions{.alpha = o.alpha, .rule = o.rule};
  } else {
    const double s = scale_for(o, r);
    if (s == 0.0)
      m.options = DeltaOptions{.alpha = 0.0, .rule = o.rule, .user_scale = 0.0};
    else
      m.options = DeltaOptions{
          .alpha = o.rule == Scaling::rslora ? s * std::sqrt(static_cast<double>(r)) : s * static_cast<double>(r),
          .rule = o.rule};
  }
  return m;
}

namespace detail::peft {
/// PEFT's alpha for a module's scale under the config's rule.
template <class T>
double peft_alpha(const PeftModule<T>& m, bool rslora) {
  const double s = m.scale();
  const double r = static_cast<double>(m.rank());
  return rslora ? s * std::sqrt(r) : s * r;
}
}  // namespace detail::peft

/// An adapter whose config describes `modules` as PEFT needs it: r and lora_alpha
/// the most common rank and alpha, rank_pattern / alpha_pattern entries
/// ("^<escaped path>", an exact match) for the others, use_rslora from the
/// modules' rule (ValueError if they disagree), lora_bias where any module has a
/// bias, target_modules the module paths unless `config` already has targets.
template <class T>
PeftAdapter<T> make_peft_adapter(std::vector<PeftModule<T>> modules, PeftConfig config = {},
                                 std::string name = "default") {
  using lora::detail::raise;
  constexpr const char* where = "make_peft_adapter";
  std::sort(modules.begin(), modules.end(), [](const auto& x, const auto& y) { return x.path < y.path; });
  std::optional<Scaling> rule;
  for (const auto& m : modules) {
    if (m.scale() == 0.0 || m.options.alpha == 0.0) continue;  // the rule does not matter at scale 0 / user scale
    if (rule && *rule != m.options.rule)
      raise<ValueError>(where, ": module '", m.path,
                        "' uses a different scaling rule than the others; PEFT's use_rslora is one flag per adapter");
    rule = m.options.rule;
  }
  config.use_rslora = rule.value_or(Scaling::standard) == Scaling::rslora;
  std::map<index_t, int> rank_count;
  std::map<double, int> alpha_count;
  for (const auto& m : modules) {
    ++rank_count[m.rank()];
    ++alpha_count[detail::peft::peft_alpha(m, config.use_rslora)];
  }
  auto most = [](const auto& counts, auto fallback) {
    auto best = fallback;
    int n = -1;
    for (const auto& [v, c] : counts)
      if (c > n) best = v, n = c;
    return best;
  };
  config.r = static_cast<int>(most(rank_count, static_cast<index_t>(config.r)));
  config.lora_alpha = most(alpha_count, config.lora_alpha);
  config.rank_pattern.clear();
  config.alpha_pattern.clear();
  config.lora_bias = false;
  for (const auto& m : modules) {
    const std::string key = "^" + detail::peft::regex_escape(m.path);
    if (m.rank() != config.r) config.rank_pattern.emplace_back(key, static_cast<int>(m.rank()));
    const double alpha = detail::peft::peft_alpha(m, config.use_rslora);
    if (alpha != config.lora_alpha) config.alpha_pattern.emplace_back(key, alpha);
    if (m.bias) config.lora_bias = true;
  }
  if (!config.target_modules && !config.target_modules_regex) {
    std::vector<std::string> paths;
    for (const auto& m : modules) paths.push_back(m.path);
    config.target_modules = std::move(paths);
  }
  config.peft_type = "LORA";
  // DoRA is a per-config switch in PEFT: every module has m, or none.
  const auto with_m = std::ranges::count_if(modules, [](const auto& m) { return m.magnitude.has_value(); });
  if (with_m != 0 && with_m != static_cast<std::ptrdiff_t>(modules.size()))
    lora::detail::raise<ValueError>("make_peft_adapter: ", with_m, " of ", modules.size(),
                                    " modules carry a DoRA magnitude; PEFT's use_dora applies to all or none");
  config.use_dora = with_m != 0;
  PeftAdapter<T> a;
  a.name = std::move(name);
  a.config = std::move(config);
  a.modules = std::move(modules);
  return a;
}

/// Writes `a` to `dir` (created if needed) as adapter_config.json and
/// adapter_model.safetensors: PeftModel.from_pretrained(model, dir) loads it
/// unchanged. Tensors are stored as `stored` (F32, F16, BF16 or F64); each file is
/// written to a temporary name and renamed. ValueError where the config does not
/// describe the modules as PEFT would read them (rank, scale, target, bias):
/// make_peft_adapter builds a config that does.
template <class T>
void save_peft(const PeftAdapter<T>& a, const std::filesystem::path& dir, DType stored = DType::F32) {
  namespace fs = std::filesystem;
  using lora::detail::raise;
  constexpr const char* where = "save_peft";
  if (!is_floating_dtype(stored))
    raise<ValueError>(where, ": stored dtype ", dtype_name(stored), " is not F32, F16, BF16 or F64");
  const PeftConfig& cfg = a.config;
  if (cfg.peft_type != "LORA") raise<ValueError>(where, ": peft_type '", cfg.peft_type, "' is not LORA");

  SafetensorsWriter w;
  w.set_metadata("format", "pt");
  std::map<std::string, int> seen;
  for (const PeftModule<T>& m : a.modules) {
    const std::string& p = m.path;
    if (p.empty() || p.front() == '.' || p.back() == '.' || p.find("..") != std::string::npos)
      raise<ValueError>(where, ": module path '", p, "' is not a dotted module name");
    if (seen[p]++) raise<ValueError>(where, ": module '", p, "' appears twice");
    if (m.A.rows() <= 0 || m.A.cols() <= 0 || m.B.rows() <= 0 || m.B.cols() != m.A.rows())
      raise<RankError>(where, ": module '", p, "': B is [", m.B.rows(), ", ", m.B.cols(), "] and A is [", m.A.rows(),
                       ", ", m.A.cols(), "]; B's columns must equal A's rows (the rank)");
    lora::detail::check_options(where, m.options);
    if (!cfg.targets(p))
      raise<ValueError>(where, ": module '", p,
                        "' is not selected by the config's target_modules (PEFT would ignore its tensors)");
    if (cfg.rank_for(p) != m.rank())
      raise<ValueError>(where, ": module '", p, "' has rank ", m.rank(), " but the config gives r = ", cfg.rank_for(p),
                        " (set rank_pattern, or build the adapter with make_peft_adapter)");
    const double want = m.scale();
    const double got = scale_for(cfg.options_for(p), m.rank());
    if (!(std::fabs(want - got) <= 1e-12 * std::max(std::fabs(want), std::fabs(got))))
      raise<ValueError>(where, ": module '", p, "' has scale ", want, " but the config gives PEFT scale ", got,
                        " (alpha ", cfg.alpha_for(p), ", ", cfg.use_rslora ? "alpha / sqrt(r)" : "alpha / r",
                        "; set lora_alpha / alpha_pattern / use_rslora, or use make_peft_adapter)");
    const std::string base = std::string(detail::peft::key_prefix) + p;
    if (cfg.use_dora != m.magnitude.has_value())
      raise<ValueError>(where, ": module '", p, "' ", m.magnitude ? "has" : "has no",
                        " DoRA magnitude but the config has use_dora = ", cfg.use_dora ? "true" : "false");
    if (m.embedding) {
      if (m.bias) raise<ValueError>(where, ": embedding module '", p, "' has a bias; PEFT's embedding LoRA has none");
      if (m.magnitude) raise<ValueError>(where, ": embedding module '", p, "': DoRA on embeddings is not supported");
      w.add(base + ".lora_embedding_A", m.A, stored);
      w.add(base + ".lora_embedding_B", m.B, stored);
      continue;
    }
    w.add(base + ".lora_A.weight", m.A, stored);
    w.add(base + ".lora_B.weight", m.B, stored);
    if (m.bias) {
      if (!cfg.lora_bias)
        raise<ValueError>(where, ": module '", p, "' has a bias but the config has lora_bias = false");
      if (m.bias->size() != m.B.rows())
        raise<ShapeError>(where, ": module '", p, "': bias has ", m.bias->size(), " entries, lora_B has ", m.B.rows(),
                          " rows");
      w.add_vector(base + ".lora_B.bias", *m.bias, stored);
    } else if (cfg.lora_bias) {
      // PEFT creates a lora_B bias on every module when lora_bias is set: no bias is a zero one.
      w.add_vector(base + ".lora_B.bias", Eigen::Matrix<T, Eigen::Dynamic, 1>::Zero(m.B.rows()), stored);
    }
    if (m.magnitude) {
      if (m.magnitude->size() != m.B.rows())
        raise<ShapeError>(where, ": module '", p, "': the DoRA magnitude has ", m.magnitude->size(),
                          " entries, lora_B has ", m.B.rows(), " rows");
      w.add_vector(base + ".lora_magnitude_vector", *m.magnitude, stored);
    }
  }
  for (const auto& [key, value] : a.saved) {
    if (!std::string_view(key).starts_with(detail::peft::key_prefix))
      raise<ValueError>(where, ": saved tensor '", key, "' does not start with '", detail::peft::key_prefix, "'");
    auto shape = a.saved_shape.find(key);
    if (shape != a.saved_shape.end() && shape->second.size() == 1) {
      if (value.rows() != 1 || value.cols() != shape->second[0])
        raise<ShapeError>(where, ": saved tensor '", key, "' is [", value.rows(), ", ", value.cols(),
                          "] but saved_shape says [", shape->second[0], "]");
      w.add_vector(key, value.row(0).transpose(), stored);
    } else {
      w.add(key, value, stored);
    }
  }

  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) raise<Error>(where, ": cannot create the directory ", dir.string(), ": ", ec.message());
  w.write(dir / "adapter_model.safetensors");  // a temporary file, then a rename
  const std::string json = cfg.to_json();
  detail::peft::write_atomic(dir / "adapter_config.json", std::as_bytes(std::span(json.data(), json.size())), where);
}

}  // namespace lora::io
