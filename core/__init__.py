"""The shared core of gkd's parts (training, export, bench, orchestration): errors, file writing, config loading,
console logging and the lazily loaded command groups. It imports nothing of gkd's other packages."""
