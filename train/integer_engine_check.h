// The integer engine (deploy/integer_engine.h) run on a whole test set beside
// the fake-quant model it was exported from: its accuracy, and on how many
// images its logits equal the fake-quant evaluation's (all of them, if the
// engine's claim holds: the run's table says so or shows the difference).
#pragma once
#include <memory>
#include <string>

#include "data/dataset.h"
#include "layers/model.h"
#include "train/evaluate.h"

namespace hfq {

struct IntegerEngineCheck {
    EvalResult engine;             // the integer engine's loss and accuracy
    int64_t identical_logits = 0;  // images whose logits equal the fake-quant model's, every class
};

// `fake_quant` runs in evaluation mode (its mode is restored); the options'
// part / parts / sum shard it as evaluate() does.
IntegerEngineCheck check_integer_engine(const std::string& export_path, Model& fake_quant,
                                        std::shared_ptr<const Dataset> data, const EvalOptions& options);

}  // namespace hfq
