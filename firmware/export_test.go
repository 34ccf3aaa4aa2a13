package firmware

// SetMaxOpen shrinks the handle cache so tests can exercise eviction.
func SetMaxOpen(s *Store, n int) {
	s.files.mu.Lock()
	defer s.files.mu.Unlock()
	s.files.max = n
}

// OpenHandles returns how many handles the cache holds.
func OpenHandles(s *Store) int {
	s.files.mu.Lock()
	defer s.files.mu.Unlock()
	return len(s.files.open)
}
