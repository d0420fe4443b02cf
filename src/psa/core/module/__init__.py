"""PSA on any torch.nn.Module factory: its ablatable units (torch.fx), and a population of it
trained through torch.func with the engine's arithmetic."""
