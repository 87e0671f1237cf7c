"""What every layer uses: errors, settings dataclass helpers, atomic storage, torch.distributed, progress
bars, the hub probe, package versions, pause points for kill tests, and reproducible seeds."""
