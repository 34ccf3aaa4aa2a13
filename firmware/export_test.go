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

// SetBeforeVerdict makes p call fn after making a patch and before storing its verdict, so a
// test can act exactly in between. Call it before Start.
func SetBeforeVerdict(p *Patcher, fn func(base, target string)) { p.beforeVerdict = fn }
