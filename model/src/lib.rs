//! Kiln model (GPT, data, trainers). The model arrives with the pretraining issue.
