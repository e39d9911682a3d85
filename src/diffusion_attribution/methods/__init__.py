"""Attribution methods and the pieces they share (which weights a method looks at)."""
