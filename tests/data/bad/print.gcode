;FLAVOR:Marlin
;Generated with Cura
G28 ; home
G1 X10 Y10 F3000
M104 S200
G1 E5
M84
