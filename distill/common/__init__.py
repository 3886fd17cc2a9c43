"""What every layer shares, with no Lightning in it: the user error, atomic files and locks, the rule for names
that become folders, option ranges, seeds, the content identity of results, weight-file reading, and the one
adapter to private library members."""
