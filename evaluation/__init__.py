"""Evaluation: the ppl_eval / sample_eval jobs and their JSON (jobs), the judge LM's
generative perplexity (gen_ppl), and the posterior-collapse diagnostics
(latent_diagnostics)."""
