"""The recsqueeze component library: types, data, models, stages, evaluation, gate, storage."""
